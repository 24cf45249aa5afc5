"""Chat templates: find one (--chat-template, tokenizer_config.json, GGUF metadata) and render it.

A template is untrusted code: it comes from a downloaded file, and llama-cpp-python's
CVE-2024-34359 ran arbitrary Python from a GGUF template. So rendering happens in jinja2's
ImmutableSandboxedEnvironment, the template only ever sees plain JSON data, and every failure
(sandbox violation, syntax error, raise_exception) becomes one TemplateError sentence. The
sandbox is template_sandbox.BoundedSandbox, so a render also ends within its time, size and
iteration limits (template_budget.TemplateLimits, raised with MISTRALRS_TEMPLATE_* variables).
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext

from mistralrs_cli.errors import UserError

from .template_budget import BudgetExceeded, TemplateLimits, budget, current
from .template_sandbox import BoundedSandbox

_MAX_MESSAGE = 1000


class TemplateError(UserError):
    """A chat template failed to compile or render; `template_message` is the template's own text
    (e.g. what it passed to raise_exception), `origin` where the template came from."""

    def __init__(self, message: str, origin: str = "", template_message: str = ""):
        # one line, of a readable length, whatever text the template raised
        message = re.sub(r"\s*\n\s*", " ", message)
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE - 1] + "…"
        super().__init__(message)
        self.origin = origin
        self.template_message = template_message


class _Raised(jinja2.TemplateError):
    """What a template's raise_exception(...) throws; turned into a TemplateError by render()."""


def _raise_exception(message: str) -> None:
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    current().expect(12 * len(str(fmt)))  # "%c" (2 characters) writes 24
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, > and &, which would change the prompt; transformers'
    # filter is plain json.dumps with these keyword defaults, and templates are written for it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so a template cannot plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.bound_filters()
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace)
    return env


_ENV = _environment()


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _plain(value: Any) -> Any:
    """A copy made only of JSON types: objects with methods (str subclasses, arrays, images) could
    offer the sandbox callables it does not know are dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def flatten_text_content(messages: list[dict]) -> list[dict]:
    """Messages whose content is a list of parts get the text parts joined by newlines (as vLLM
    does), which is what a text-only template expects; non-text parts are dropped."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out


class ChatTemplate:
    """A template's source text and where it came from (for error messages)."""

    def __init__(self, source: str, origin: str):
        if not isinstance(source, str):  # e.g. a crafted GGUF's tokenizer.chat_template array
            raise TemplateError(f"The chat template from {origin} is a {type(source).__name__}, not "
                                f"text; pass a working one with --chat-template.", origin)
        self.source = source
        self.origin = origin
        limits = TemplateLimits.from_env()
        if len(source) > limits.source_chars:
            raise TemplateError(
                f"The chat template from {origin} is {len(source):,} characters long, more than the "
                f"{limits.source_chars:,} allowed; pass a working one with --chat-template, or "
                f"raise MISTRALRS_TEMPLATE_SOURCE_CHARS if you trust this one.", origin)
        try:
            # constant folding at compile time runs filters and operators; Python's compiler
            # warns (SyntaxWarning on stderr) about odd constants a template may hold
            with budget(limits), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(
                f"The chat template from {origin} has a Jinja syntax error on line {e.lineno} "
                f"({e.message}); fix it or pass a working one with --chat-template.", origin) from None
        except (SyntaxError, RecursionError, MemoryError, OverflowError) as e:
            # what jinja lets through to Python's compiler: blocks nested past 20, expressions
            # nested past its parser's depth, a {% break %} outside a loop
            raise TemplateError(
                f"The chat template from {origin} could not be compiled ({type(e).__name__}: {e}); "
                f"pass a working one with --chat-template.", origin) from None

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, {len(self.source)} chars)"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
               eos_token: str = "", *, flatten_content: bool = True, **extra: Any) -> str:
        """The prompt text for `messages`. Vision callers pass flatten_content=False to keep the
        content parts (images) for templates that place image tokens themselves."""
        if flatten_content:
            messages = flatten_text_content(messages)
        # tools/documents are always defined (None when absent), as transformers passes them.
        try:
            context = _plain({"tools": None, "documents": None, **extra, "messages": messages,
                              "add_generation_prompt": add_generation_prompt,
                              "bos_token": bos_token, "eos_token": eos_token})
        except RecursionError:
            raise UserError("The messages (or tools) nest too deeply to render; flatten them.") from None
        limits = TemplateLimits.from_env()
        try:
            with budget(limits) as b:
                b.learn(context)
                # concat counts the output as generate() yields it and stops at max_chars
                return _ENV.concat(self._template.generate(**context))
        except Exception as e:  # noqa: BLE001 - anything the untrusted template did is its failure
            raise self._failure(e) from None

    def _failure(self, e: Exception) -> TemplateError:
        """The one sentence for what stopped a render."""
        where = f"The chat template from {self.origin}"
        if isinstance(e, BudgetExceeded):
            var = f"MISTRALRS_TEMPLATE_{e.limit.upper()}"
            return TemplateError(f"{where} {e.detail}, over its limit; pass a working template with "
                                 f"--chat-template, or raise {var} if you trust this one.",
                                 self.origin, e.detail)
        if isinstance(e, RecursionError):
            return TemplateError(f"{where} recursed too deeply (a macro or recursive loop that never "
                                 f"ends?); pass a working template with --chat-template.", self.origin)
        if isinstance(e, MemoryError):
            return TemplateError(f"{where} ran out of memory while rendering; pass a working "
                                 f"template with --chat-template.", self.origin)
        if isinstance(e, _Raised):
            return TemplateError(f"{where} rejected the messages: {e.message}", self.origin, str(e.message))
        if isinstance(e, jinja2.exceptions.SecurityError):
            return TemplateError(f"{where} attempted an unsafe operation and was stopped ({e}); use a "
                                 f"trusted template with --chat-template.", self.origin, str(e))
        return TemplateError(f"{where} failed on these messages ({type(e).__name__}: {e}); check the "
                             f"messages or pass another template with --chat-template.", self.origin, str(e))


def _named_template(value: Any, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{where} lists chat templates {sorted(map(str, named))} but none named "
                        f"'default'; pick one and pass it with --chat-template.")
    raise UserError(f"{where} has a chat_template of type {type(value).__name__}; it must be a "
                    f"string or a list of {{\"name\", \"template\"}} entries.")


def _from_cli(value: str) -> ChatTemplate:
    if "{{" in value or "{%" in value:  # Jinja tags: a literal template, never a path
        return ChatTemplate(value, "--chat-template")
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a name too long to be a path
        is_file = False
    if not is_file:
        # No Jinja tags and no such file: almost surely a mistyped path, not a template.
        raise UserError(f"--chat-template {value!r} is neither an existing file nor a Jinja template; "
                        f"pass a .json (with a chat_template key), .jinja or .j2 file, or a template string.")
    if path.suffix != ".json":
        return ChatTemplate(path.read_text(encoding="utf-8"), f"--chat-template {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template file {path} is not valid JSON ({e}); fix it or pass "
                        f"a .jinja file.") from None
    source = _named_template(data.get("chat_template") if isinstance(data, dict) else None,
                             f"--chat-template file {path}")
    if source is None:
        raise UserError(f"--chat-template file {path} has no \"chat_template\" key; add one "
                        f"or pass a .jinja file.")
    return ChatTemplate(source, f"--chat-template {path}")


def resolve_chat_template(cli_value: str | None, tokenizer_config: dict | None,
                          gguf_template: str | None) -> ChatTemplate | None:
    """The first template found: --chat-template, tokenizer_config.json, GGUF metadata; else None
    (chat requests then fail with a clear 400, plain prompts still work)."""
    if cli_value:
        return _from_cli(cli_value)
    if tokenizer_config:
        source = _named_template(tokenizer_config.get("chat_template"), "tokenizer_config.json")
        if source:
            return ChatTemplate(source, "tokenizer_config.json")
    if gguf_template:
        return ChatTemplate(gguf_template, "GGUF tokenizer.chat_template")
    return None
