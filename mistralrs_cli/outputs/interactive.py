"""-i: a chat in the terminal. prompt_toolkit reads the input on a tty (history, multi-line, keys);
from a pipe, each line is one message. Answers stream to stdout, notices and stats go to stderr."""
from __future__ import annotations

import math
import re
import signal
import sys
from dataclasses import replace
from typing import Any, Callable

from ..api import Runner
from ..errors import UserError
from ..validation import check_adapters, check_text
from ..loaders.load import cache_root
from ..prompting import chat_ids, chat_prompt
from ..sampling_defaults import sampling_params
from ..types import EngineConfig, SamplingParams
from .oneshot import _load, length_notice, stats_line
from .request_log import RequestLog

try:
    import termios
except ImportError:  # Windows: no terminal settings to touch
    termios = None

HELP = r"""commands:
  \help               this list
  \exit               leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
  \clear              forget the conversation (the system prompt stays)
  \system <text>      set the system prompt (\system alone removes it)
  \temperature <x>    set the sampling temperature, 0 or more (0 is greedy)
{adapter}keys: Enter sends; Alt+Enter (Esc, Enter) or a trailing \ starts a new line;
      Ctrl-C stops a running answer"""

IMAGE_HELP = "  \\image <path or URL> <text>  ask about an image (vision models)\n"
ADAPTER_HELP = ("  \\adapter <names>    run this chat with these LoRA adapters (\\adapter alone lists them)\n")

_COMMAND = re.compile(r"\\([A-Za-z_]+)(?:\s+(.*))?\Z", re.DOTALL)


class LineDiscarded(Exception):
    """Ctrl-C on a typed line: drop the line and prompt again, as shells do."""


def _image_ref(arg: str) -> tuple[str, str]:
    """\\image's path or URL and the text after it. A path with spaces comes quoted ('a b.png' or
    "a b.png", as terminals paste a dropped file) or with escaped spaces (a\\ b.png)."""
    if arg[:1] in ("'", '"'):
        end = arg.find(arg[0], 1)
        if end > 0:
            return arg[1:end], arg[end + 1:].strip()
    ref, i = [], 0
    while i < len(arg) and not arg[i].isspace():
        if arg[i] == "\\" and arg[i + 1:i + 2] == " ":
            i += 1
        ref.append(arg[i])
        i += 1
    return "".join(ref), arg[i:].strip()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Streaming:
    """While an answer streams, a first Ctrl-C asks to stop after the current token (the engine
    stays consistent); a second one stops at once. The terminal echo is off meanwhile, so that
    neither ^C nor type-ahead lands inside the answer."""

    def __enter__(self) -> "_Streaming":
        self.requested = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        self._tty = _echo_off()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._tty is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._tty)
        signal.signal(signal.SIGINT, self._old)


def _echo_off() -> list | None:
    """Turn the terminal's echo off; returns the settings to restore (None: not a terminal)."""
    if termios is None or not sys.stdin.isatty():
        return None
    try:
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
        new = list(old)
        new[3] &= ~(termios.ECHO | termios.ECHOCTL)
        termios.tcsetattr(fd, termios.TCSADRAIN, new)
        return old
    except (termios.error, OSError, ValueError):
        return None


class Chat:
    """The conversation (a system prompt and the turns) and the sampling settings."""

    def __init__(self, runner: Runner, params: SamplingParams, log: RequestLog, quiet: bool):
        self.runner, self.params, self.log, self.quiet = runner, params, log, quiet
        self.system: str | None = None
        self.turns: list[dict[str, str]] = []
        self.commands: dict[str, Callable[[str], bool]] = {
            "help": self.cmd_help, "exit": self.cmd_exit, "clear": self.cmd_clear,
            "system": self.cmd_system, "temperature": self.cmd_temperature, "adapter": self.cmd_adapter,
            "image": self.cmd_image,
        }

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    # ---- the read loop ----
    def loop(self, read: Callable[[], str | None]) -> None:
        armed = False  # a Ctrl-C at an empty prompt waits for a second one
        while True:
            try:
                line = read()
            except LineDiscarded:
                armed = False
                continue
            except KeyboardInterrupt:
                if armed:
                    return
                armed = True
                _note("(press Ctrl-C again or Ctrl-D to exit)")
                continue
            armed = False
            if line is None:
                return
            text = line.strip()
            if not text:
                continue
            try:
                check_text(text, "that line")
            except UserError as e:  # a pipe of bytes that are not UTF-8: say so, keep the chat
                _note(f"error: {e}")
                continue
            m = _COMMAND.match(text)
            if m is None:
                self.ask(text)
            elif not self.command(m.group(1), (m.group(2) or "").strip()):
                return

    # ---- commands: each returns False to leave ----
    def command(self, name: str, arg: str) -> bool:
        handler = self.commands.get(name)
        if handler is None:
            _note(f"unknown command \\{name}; type \\help for the list.")
            return True
        return handler(arg)

    def cmd_help(self, arg: str) -> bool:
        extra = (ADAPTER_HELP if self.runner.engine.adapter_names() else "") + (
            IMAGE_HELP if self.runner.loaded.vision is not None else "")
        _note(HELP.format(adapter=extra))
        return True

    def cmd_exit(self, arg: str) -> bool:
        return False

    def cmd_clear(self, arg: str) -> bool:
        self.turns.clear()
        _note("conversation cleared" + (" (the system prompt stays)." if self.system else "."))
        return True

    def cmd_system(self, arg: str) -> bool:
        if arg:
            _note("system prompt set.")
        else:
            _note("system prompt removed." if self.system else r"no system prompt to remove.")
        self.system = arg or None
        return True

    def cmd_temperature(self, arg: str) -> bool:
        if not arg:
            _note(f"temperature is {self.params.temperature:g}; set it with \\temperature <x>.")
            return True
        try:
            t = float(arg)
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            _note(f"\\temperature needs a number, 0 or more (0 is greedy); got {arg!r}.")
            return True
        self.params = replace(self.params, temperature=t)
        _note(f"temperature set to {t:g}.")
        return True

    def cmd_adapter(self, arg: str) -> bool:
        """\\adapter NAME [NAME...]: this chat's adapters; alone: what the model serves and uses."""
        served = self.runner.engine.adapter_names()
        if not served:
            _note("this model was loaded without LoRA adapters.")
            return True
        if not arg:
            active, engine = self.params.adapters, self.runner.engine
            default = "X-LoRA" if engine.xlora is not None else ", ".join(engine.active_adapters) or "none"
            now = (", ".join(active) or "none") if active is not None else f"{default} (the default)"
            _note(f"adapters: {', '.join(served)}; this chat uses {now}.")
            return True
        try:
            names = check_adapters(arg.split(), served, name=lambda k: "\\adapter")
        except UserError as e:
            _note(f"error: {e}")
            return True
        self.params = replace(self.params, adapters=names)
        _note(f"this chat now uses {', '.join(names)}.")
        return True

    def cmd_image(self, arg: str) -> bool:
        """\\image PATH_OR_URL text: a turn with that image before the text."""
        ref, text = _image_ref(arg.strip())
        if not ref:
            _note("\\image needs a path or URL, then your text: \\image cat.png What is this?")
            return True
        parts = [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": text.strip()}]
        self.ask(text.strip(), parts)
        return True

    # ---- one turn ----
    def _prompt(self, msgs: list[dict]) -> tuple[list[int], object]:
        from ..vision.chat import chat_with_images, has_images

        loaded = self.runner.loaded
        if getattr(loaded, "vision", None) is None and not has_images(msgs):
            return chat_ids(loaded, msgs), None
        return chat_with_images(loaded, msgs, allow_paths=True, where="\\image")

    def _fitted(self) -> tuple[list[dict], tuple[list[int], object]]:
        """The messages and prompt of this turn; when the conversation leaves less than a quarter
        of the model's context for the answer, its oldest exchanges are dropped until it does (as
        chat front ends do; the system prompt stays), with a notice. The current message alone is
        never cut here."""
        limit = self.runner.loaded.max_context
        msgs, kept = self.messages(), list(self.turns)
        prompt = self._prompt(msgs)
        dropped = 0
        while len(prompt[0]) > limit - limit // 4 and len(self.turns) > 2:
            del self.turns[:2]  # a user message and its answer
            dropped += 1
            msgs = self.messages()
            prompt = self._prompt(msgs)
        if dropped and len(prompt[0]) >= limit:  # the message alone does not fit: the history stays
            self.turns[:] = kept
            msgs = self.messages()
            return msgs, self._prompt(msgs)
        if dropped:
            _note(f"(the conversation outgrew the model's {limit}-token context: its {dropped} oldest "
                  f"exchange{'s' if dropped > 1 else ''} dropped)")
        return msgs, prompt

    def ask(self, text: str, content: list | None = None) -> None:
        self.turns.append({"role": "user", "content": text if content is None else content})
        msgs = self.messages()
        try:
            msgs, prompt = self._fitted()
            answer, last, stopped = self._stream(*prompt, msgs)
        except UserError as e:
            self.turns.pop()
            self.log.write("error", {"messages": msgs, "error": str(e)})
            hint = r" (\clear starts a new conversation)" if self.turns else ""
            _note(f"error: {e}{hint}")
            return
        if answer or not stopped:
            self.turns.append({"role": "assistant", "content": answer})
        else:  # stopped before its first word: forget the question too
            self.turns.pop()
        self.log.write("response", {"text": answer, "finish_reason": "cancelled" if stopped else
                                    (last.finish_reason if last else None)})
        if stopped:
            _note("[answer stopped]")
        elif last is not None and last.finish_reason == "length" and not self.quiet:
            _note(length_notice(self.params, last.completion_tokens, self.runner.loaded.max_context))
        if last is not None and not self.quiet:
            _note(stats_line(last.prompt_tokens, last.prompt_time, last.completion_tokens, last.decode_time))

    def _stream(self, ids: list[int], images, msgs: list[dict[str, str]]):
        """Stream one answer to stdout. Returns (text, last delta, stopped by Ctrl-C)."""
        self.log.write("request", {"messages": msgs, "prompt_tokens": len(ids)})
        parts, last, stopped = [], None, False
        gen = self.runner.stream(ids, self.params, **({} if images is None else {"images": images}))
        with _Streaming() as sigint:
            try:
                for out in gen:
                    if sigint.requested and out.finish_reason is None:
                        stopped = True
                        break
                    if out.text:
                        sys.stdout.write(out.text)
                        sys.stdout.flush()
                        parts.append(out.text)
                    last = out
            except KeyboardInterrupt:
                stopped = True
            finally:
                gen.close()  # engine.generate's finally aborts the request
        if parts or not stopped:  # one line per answer, for scripts reading stdout
            sys.stdout.write("\n")
            sys.stdout.flush()
        return "".join(parts), last, stopped


# ---- input ----
def _readline() -> str:
    """One line of stdin; bytes that are not UTF-8 come through as surrogates (for the loop to
    name), where a strict text stream would raise in the middle of a chat."""
    buf = getattr(sys.stdin, "buffer", None)
    return buf.readline().decode("utf-8", errors="surrogateescape") if buf is not None else sys.stdin.readline()


def _pipe_reader(prompt: bool) -> Callable[[], str | None]:
    """Plain lines (stdin is not a terminal): a line ending with a backslash continues."""

    def read() -> str | None:
        lines = []
        while True:
            if prompt:
                sys.stderr.write("> " if not lines else ". ")
                sys.stderr.flush()
            line = _readline()
            if not line:
                return "\n".join(lines) if lines else None
            line = line.rstrip("\r\n")
            if not line.endswith("\\"):
                return "\n".join(lines + [line])
            lines.append(line[:-1])

    return read


def _history():
    """A file under the cache when it is writable, else memory; history is never fatal."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    class QuietFileHistory(FileHistory):
        def store_string(self, string: str) -> None:
            try:
                super().store_string(string)
            except OSError:
                pass

    path = cache_root() / "history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("ab").close()
        return QuietFileHistory(str(path))
    except OSError:
        return InMemoryHistory()


def _tty_reader() -> Callable[[], str | None]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("enter")
    def _send(event: Any) -> None:
        buf = event.current_buffer
        if buf.text.endswith("\\"):
            buf.cursor_position = len(buf.text)
            buf.delete_before_cursor(1)
            buf.newline(copy_margin=False)
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.newline(copy_margin=False)

    @kb.add("c-c")
    def _cancel(event: Any) -> None:
        exc = LineDiscarded() if event.current_buffer.text else KeyboardInterrupt()
        event.app.exit(exception=exc, style="class:aborting")

    session = PromptSession(history=_history(), key_bindings=kb, multiline=True,
                            prompt_continuation=". ", enable_history_search=False)

    def read() -> str | None:
        try:
            return session.prompt("> ")
        except EOFError:
            return None

    return read


def run_interactive(opts, spec, flags: dict, config: EngineConfig | None = None) -> None:
    """flags: the sampling flags given (run.sampling_flags); the model's defaults fill the rest."""
    log = RequestLog(opts.request_log)
    loaded = _load(opts, spec)
    if loaded.chat_template is None:
        chat_prompt(loaded, [])  # raises the one-line "no chat template" UserError
    runner = Runner(spec, token_source=opts.load.token_source, chat_template=opts.load.chat_template,
                    truncate_sequence=opts.truncate_sequence, loaded=loaded, engine_config=config,
                    _flag_names=True)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if not opts.quiet:
        _note(f"{loaded.model_id} is ready: type a message, \\help for commands, Ctrl-D to exit.")
    read = _tty_reader() if tty else _pipe_reader(prompt=sys.stdin.isatty())
    Chat(runner, sampling_params(flags, loaded.generation_config), log, opts.quiet).loop(read)
