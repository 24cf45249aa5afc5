"""Request fields -> a Grammar: mistral.rs's `grammar` {"type", "value"} and OpenAI's
`response_format`, the same rules for the server's JSON bodies and the Python API's fields.

"yacc" (the seed README's word for mistral.rs's grammar type) is taken as Lark; a JSON schema
may come as an object or as JSON text. Mistakes are ParamErrors naming the field (the server's
400 `param`); `checked` then compiles the grammar against the model's vocabulary.
"""
from __future__ import annotations

import json
from typing import Any

from ..types import Grammar
from ..validation import ParamError
from .compile import KINDS, json_object

_ALIASES = {"yacc": "lark"}


def _text(value: Any, kind: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if kind in ("json_schema", "llguidance") and isinstance(value, (dict, bool)):
        return json.dumps(value)
    want = "a string or a JSON object" if kind in ("json_schema", "llguidance") else "a string"
    raise ParamError(f"{field}.value must be {want} for type {kind!r}, got {type(value).__name__}.", field)


def from_grammar_field(g: Any, field: str = "grammar") -> Grammar | None:
    """mistral.rs's {"type": regex|lark|yacc|json_schema|llguidance, "value": ...} (or a Grammar)."""
    if g is None or isinstance(g, Grammar):
        return g
    if not isinstance(g, dict) or "type" not in g or "value" not in g:
        raise ParamError(f'{field} must be an object {{"type": "regex"|"lark"|"json_schema"|"llguidance", '
                         f'"value": ...}}, got {json.dumps(g)[:80]}.', field)
    kind = _ALIASES.get(g["type"], g["type"]) if isinstance(g["type"], str) else None
    if kind not in KINDS:
        raise ParamError(f"{field}.type is {json.dumps(g['type'])[:40]}; use one of regex, lark (or yacc), json_schema, "
                         "llguidance.", field)
    return Grammar(kind, _text(g["value"], kind, field))


def from_response_format(fmt: Any, field: str = "response_format") -> Grammar | None:
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), or
    json_schema {"name", "schema", "strict"}."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise ParamError(f'{field}.json_schema must be an object with a "schema" (a JSON schema object), '
                             'e.g. {"name": "answer", "schema": {"type": "object"}}.', field)
        return Grammar("json_schema", json.dumps(spec["schema"]))
    raise ParamError(f'{field} must be {{"type": "text"}}, {{"type": "json_object"}} or {{"type": '
                     f'"json_schema", "json_schema": {{...}}}}, got {json.dumps(fmt)[:80]}.', field)


def from_fields(grammar: Any, response_format: Any) -> Grammar | None:
    """The one constraint a request asks for (both fields at once is a mistake)."""
    g, f = from_grammar_field(grammar), from_response_format(response_format)
    if g is not None and f is not None:
        raise ParamError("send either grammar or response_format, not both.", "grammar")
    return g or f


def checked(loaded: Any, grammar: Any, response_format: Any) -> Grammar | None:
    """from_fields, then compiled for this model's vocabulary: every mistake a ParamError."""
    from ..errors import UserError
    from . import check

    g = from_fields(grammar, response_format)
    if g is not None:
        field = "grammar" if grammar is not None else "response_format"
        where = f"{field}.value" if field == "grammar" else (
            "response_format" if response_format.get("type") == "json_object" else "response_format.json_schema.schema")
        try:
            check(loaded, g, where)
        except ParamError:
            raise
        except UserError as e:
            raise ParamError(str(e), field) from None
    return g
