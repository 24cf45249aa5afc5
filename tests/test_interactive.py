"""`mistralrs -i` driven as a user drives it: through a pty (pexpect) on the real SmolLM2 model,
and through a pipe. Each session loads the model once, so the tests are few and long."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from conftest import MODELS  # noqa: E402

CLI = str(Path(sys.executable).with_name("mistralrs"))
TIMEOUT = 120
# prompt_toolkit draws "> " with cursor moves; it turns bracketed paste on when the prompt is up
PROMPT = "\x1b[?2004h"


@pytest.fixture
def env(tmp_path):
    """A private cache (history lands there) that shares the real models and tokenizers."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(MODELS)
    (MODELS.parent / "tokenizers").mkdir(exist_ok=True)
    (cache / "tokenizers").symlink_to(MODELS.parent / "tokenizers")
    return {**os.environ, "TERM": "xterm", "MISTRALRS_CLI_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "200"}


def spawn(args: list[str], env: dict[str, str]):
    child = pexpect.spawn(CLI, args, env=env, timeout=TIMEOUT, encoding="utf-8", dimensions=(50, 200))
    child.expect("is ready")
    child.expect_exact(PROMPT)
    return child


def say(child, line: str) -> None:
    child.send(line + "\r")


def requests(log: Path) -> list[list[dict]]:
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    return [x["body"]["messages"] for x in lines if x["kind"] == "request"]


def responses(log: Path) -> list[str]:
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    return [x["body"]["text"] for x in lines if x["kind"] == "response"]


def test_session_commands_and_history(smollm2_path, env, tmp_path):
    log = tmp_path / "requests.jsonl"
    child = spawn(["--temperature", "0", "--max-tokens", "4", "--log", str(log), "-i", "gguf",
                   "-f", str(smollm2_path)], env)
    say(child, r"\system You answer in one word.")
    child.expect("system prompt set")
    # a trailing backslash and Alt+Enter (Esc, Enter) both start a new line
    say(child, "What is the capital \\")
    child.send("of\x1b\r")
    say(child, "France?")
    child.expect("generated: ")
    child.expect_exact(PROMPT)
    say(child, "And of Germany?")
    child.expect("generated: ")
    child.expect_exact(PROMPT)
    first, second = requests(log)
    answers = responses(log)
    assert first == [{"role": "system", "content": "You answer in one word."},
                     {"role": "user", "content": "What is the capital \nof\nFrance?"}]
    assert all(a.strip() for a in answers)
    assert second == first + [{"role": "assistant", "content": answers[0]},
                              {"role": "user", "content": "And of Germany?"}]

    say(child, r"\temperature 0.5")
    child.expect("temperature set to 0.5")
    say(child, r"\temperature hot")
    child.expect("needs a number")
    say(child, r"\frobnicate now")
    child.expect(r"unknown command \\frobnicate")
    say(child, r"\help")
    child.expect(r"\\temperature <x>")
    say(child, r"\clear")
    child.expect("conversation cleared")
    say(child, "Hi")
    child.expect("generated: ")
    child.expect_exact(PROMPT)
    assert requests(log)[2] == first[:1] + [{"role": "user", "content": "Hi"}]
    say(child, r"\exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (Path(env["MISTRALRS_CLI_CACHE"]) / "history").read_text()
    assert "+And of Germany?" in history and "+\\clear" in history


def test_ctrl_c_stops_the_answer_and_twice_exits(smollm2_path, env, tmp_path):
    log = tmp_path / "requests.jsonl"
    child = spawn(["--temperature", "0", "--ignore-eos", "--max-tokens", "100000", "--log", str(log),
                   "-i", "gguf", "-f", str(smollm2_path)], env)
    say(child, "Count from 1 to 100.")
    child.expect("2. 2")
    child.send("\x03")
    child.expect(r"\[answer stopped\]")
    child.expect("generated: ")
    child.expect_exact(PROMPT)
    say(child, "Go on.")  # the session goes on, with the stopped answer in the conversation
    child.expect_exact("\x1b[?2004l")  # the prompt is closed: what follows is the answer
    child.expect(r"\w")
    child.send("\x03")
    child.expect(r"\[answer stopped\]")
    child.expect_exact(PROMPT)
    partial = requests(log)[1][1]
    assert partial["role"] == "assistant" and "2. 2" in partial["content"]
    assert partial["content"] == responses(log)[0] and responses(log)[1].strip()

    child.send("\x03")
    child.expect("press Ctrl-C again or Ctrl-D to exit")
    child.send("typed, then dropped")
    child.send("\x03")  # a line dropped with Ctrl-C is not the second of two
    child.send("\x03")
    child.expect("press Ctrl-C again or Ctrl-D to exit")
    child.send("\x03")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_exits(smollm2_path, env):
    child = spawn(["-i", "gguf", "-f", str(smollm2_path)], env)
    child.send("\x04")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


ONE_TURN_TEMPLATE = (
    "{% if messages|length > 1 %}{{ raise_exception('this template takes one message') }}{% endif %}"
    "<|im_start|>user\n{{ messages[0]['content'] }}<|im_end|>\n<|im_start|>assistant\n")


def test_piped_stdin_one_message_a_line_and_errors_keep_the_session(smollm2_path, env, tmp_path):
    """From a pipe each line is a message; a turn that fails (here the template refuses a second
    message) is one `error:` line, and the session goes on to \\exit."""
    template = tmp_path / "one_turn.jinja"
    template.write_text(ONE_TURN_TEMPLATE)
    r = subprocess.run([CLI, "--temperature", "0", "--max-tokens", "4", "-c", str(template), "-i", "gguf",
                        "-f", str(smollm2_path)], input="Hello\nAgain\n\\exit\nNever answered\n",
                       capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr.count("generated: ") == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "this template takes one message" in errors[0]
    assert "is ready" in r.stderr and "Traceback" not in r.stderr


def test_gguf_without_chat_template_chats_with_its_familys(gemma3_path, env):
    """Gemma-3's file has no template: -i uses the built-in gemma one and says so in one line."""
    r = subprocess.run([CLI, "--max-tokens", "3", "-i", "gguf", "-f", str(gemma3_path)], input="Hi\n\\exit\n",
                       capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if "chat template" in x]
    assert len(notes) == 1 and "built-in gemma template" in notes[0]
    assert r.stderr.count("generated: ") == 1 and "error" not in r.stderr


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_exchanges(env, tmp_path):
    """A tiny model with a 64-token context: once the chat leaves less than a quarter of it for the
    answer, the oldest exchanges go (one notice each time), every message is still answered, and
    each prompt sent fits in 48 tokens; a message too long alone is one error line."""
    import gguf_builder as gb

    tok = gb.train_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    gb.write_gguf(tmp_path / "tiny.gguf", gb.tiny_llama(0, max_position_embeddings=64), gb.gguf_vocab(tok))
    log = tmp_path / "chat.jsonl"
    lines = ["hello there my friend", "and what about the weather today", "more words and more words",
             "yet another message to send", "the last one", " ".join(["long"] * 80), "after the error"]
    r = subprocess.run([CLI, "--max-tokens", "6", "--ignore-eos", "--log", str(log), "-i", "gguf", "-f",
                        str(tmp_path / "tiny.gguf")], input="\\system Ok\n" + "\n".join(lines) + "\n",
                       capture_output=True,
                       text=True, env=env, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if "outgrew the model's 64-token context" in x]
    assert notes and r.stderr.count("generated: 6 tokens") == 6
    sent = [json.loads(x)["body"] for x in log.read_text().splitlines() if json.loads(x)["kind"] == "request"]
    # within 48 tokens, unless nothing is left to drop (the system prompt and the message alone)
    assert len(sent) == 7 and all(b["prompt_tokens"] <= 48 or len(b["messages"]) == 2 for b in sent[:5] + sent[6:])
    assert sent[4]["messages"][1]["content"] != lines[0] and sent[4]["messages"][-1]["content"] == lines[4]
    assert all(b["messages"][0] == {"role": "system", "content": "Ok"} for b in sent)  # it stays
    # the message too long alone was sent after the history as it stood (nothing dropped for it)
    assert [m["role"] for m in sent[5]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[5]["messages"][1]["content"] == lines[4] and sent[6]["messages"][-1]["content"] == lines[6]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "context is 64" in errors[0]


# ---- the conversation logic alone, with a scripted engine (no model, no terminal) ----
def _out(text, finish=None):
    from types import SimpleNamespace

    return SimpleNamespace(text=text, finish_reason=finish, prompt_tokens=3, prompt_time=0.1,
                           completion_tokens=1, decode_time=0.1)


class ScriptedRunner:
    """runner.stream() plays back one script per turn; an exception in a script is raised there."""

    def __init__(self, *scripts):
        from types import SimpleNamespace

        self.scripts, self.closed, self.loaded = list(scripts), 0, SimpleNamespace(max_context=8192)

    def stream(self, ids, params):
        def gen(script):
            try:
                for item in script:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                self.closed += 1
        return gen(self.scripts.pop(0))


def test_chat_keeps_a_stopped_answer_and_survives_errors(monkeypatch, capsys):
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.outputs import interactive
    from mistralrs_cli.outputs.request_log import RequestLog
    from mistralrs_cli.types import SamplingParams

    monkeypatch.setattr(interactive, "chat_ids", lambda loaded, msgs: [1, 2, 3])
    runner = ScriptedRunner([_out("Once "), _out("upon"), KeyboardInterrupt()],  # a second Ctrl-C
                            [UserError("the prompt has 9000 tokens but the model's context is 8192")],
                            [KeyboardInterrupt()],  # stopped before the first word
                            [_out("Yes", "stop")])
    chat = interactive.Chat(runner, SamplingParams(), RequestLog(None), quiet=True)
    lines = iter(["Tell a story", "More", "Hi", "Again?", r"\exit", "never read"])
    chat.loop(lambda: next(lines))
    out, err = capsys.readouterr()
    assert chat.turns == [{"role": "user", "content": "Tell a story"},
                          {"role": "assistant", "content": "Once upon"},
                          {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes"}]
    assert out == "Once upon\nYes\n" and runner.closed == 4
    assert err.count("[answer stopped]") == 2
    assert "error: the prompt has 9000 tokens but the model's context is 8192 (\\clear starts" in err
