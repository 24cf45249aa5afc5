"""A request's Grammar -> a checked llguidance matcher, or one sentence saying what is wrong.

Every surface (server `grammar` / `response_format`, Python API, CLI flags) builds a
types.Grammar and calls `compiled` with the name the user knows the field by, so a bad regex,
an unsupported JSON-schema keyword, a Lark syntax error or a grammar no token can start is the
same UserError everywhere. Compiled matchers are kept (a few dozen) and each sequence gets a
copy, so n > 1 choices and repeated schemas compile once.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import UserError
from ..types import Grammar

KINDS = ("regex", "lark", "json_schema", "llguidance")
# whitespace_flexible off: JSON comes out compact, and a small model cannot fill its token
# budget with newlines; a schema's own "x-guidance" options still override this
_JSON_DEFAULTS = {"whitespace_flexible": False}
_KEEP = 64
_cache: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


def json_object() -> Grammar:
    """OpenAI's response_format {"type": "json_object"}: any JSON object."""
    return Grammar("json_schema", '{"type": "object"}')


def _detail(err: str) -> str:
    """llguidance's message as one line: the regex crate's 'error:' line, else the first lines,
    without the parser-state dump it appends."""
    err = err.split("\n<state>")[0]
    m = re.search(r"^error: (.*)$", err, re.M)
    text = m.group(1) if m else " ".join(line.strip() for line in err.splitlines()[:2])
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= 240 else text[:237] + "..."


def _what(kind: str) -> str:
    return {"regex": "a valid regex", "lark": "a valid Lark grammar", "json_schema": "a JSON schema that can be enforced",
            "llguidance": "a valid llguidance grammar"}[kind]


def _refuse(g: Grammar, where: str, err: str) -> UserError:
    detail = _detail(err)
    if "Unimplemented keys" in detail or "Unknown format" in detail:
        return UserError(f"{where} uses a JSON-schema keyword or format that is not supported ({detail}); "
                         "remove it or describe the value another way.")
    return UserError(f"{where} is not {_what(g.kind)} ({detail}); fix it.")


def grammar_text(g: Grammar, where: str) -> str:
    """The llguidance grammar (JSON text) for g; a UserError for an unknown kind or bad JSON."""
    import llguidance

    if g.kind not in KINDS:
        raise UserError(f"{where} has type {g.kind!r}; use one of {', '.join(KINDS)}.")
    if not isinstance(g.value, str):
        raise UserError(f"{where} needs its value as a string.")
    if g.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(g.value)
    if g.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(g.value)
    try:
        value = json.loads(g.value)
    except ValueError as e:
        raise UserError(f"{where} is not valid JSON ({e}); send the {g.kind} as a JSON object.") from None
    if g.kind == "llguidance":
        return g.value
    if not isinstance(value, (dict, bool)):
        raise UserError(f"{where} must be a JSON schema (an object), got {type(value).__name__}.")
    return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=_JSON_DEFAULTS)


def syntax_check(g: Grammar, where: str) -> None:
    """The checks that need no vocabulary (regex / Lark syntax, schema keywords), e.g. before a
    model loads; UserError naming `where`."""
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar_text(g, where))
    if err:
        raise _refuse(g, where, err)


def compiled(g: Grammar, lltok: Any, where: str = "grammar"):
    """A fresh matcher for g (a copy of the cached compiled one); UserError naming `where` when
    the grammar is invalid or no token can start it."""
    key = (id(lltok), g.kind, g.value)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is lltok:  # the entry keeps its tokenizer: the id is not reused
            _cache.move_to_end(key)
            return hit[1].deep_copy()
    matcher = _build(g, lltok, where)
    with _lock:
        _cache[key] = (lltok, matcher)
        while len(_cache) > _KEEP:
            _cache.popitem(last=False)
        return matcher.deep_copy()


def _build(g: Grammar, lltok: Any, where: str):
    import llguidance

    text = grammar_text(g, where)
    matcher = llguidance.LLMatcher(lltok, text, log_level=0)  # compiles with the GIL released
    if matcher.is_error():
        raise _refuse(g, where, matcher.get_error())
    probe = matcher.deep_copy()  # the first mask, on a copy: the cached matcher stays untouched
    bits = np.unpackbits(np.frombuffer(probe.compute_bitmask(), np.uint8), bitorder="little")
    eos = set(lltok.eos_tokens)
    starts = any(i not in eos for i in np.flatnonzero(bits[:lltok.vocab_size])[:len(eos) + 1])
    if probe.is_error() or not (starts or probe.is_accepting()):
        raise UserError(f"{where} matches no text this model can write (no token can start it); "
                        "check it accepts at least one string.")
    return matcher
