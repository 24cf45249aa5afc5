"""The grammars that make a model's tool call valid: its function name one of the tools, its
arguments valid against that function's `parameters` schema (llguidance enforces the JSON schema
while the model writes; the engine applies the mask). Built as the types.Grammar contract.

JSON is written compactly with json.dumps's separators (", " and ": "), which is how the chat
templates render calls back (tojson): a model sees its own calls as it wrote them."""
from __future__ import annotations

import json
from typing import Any, Callable

from ..types import Grammar
from ..validation import ParamError
from .spec import Function, ToolRequest

PYTHON_TAG = "<|python_tag|>"

# llguidance's JSON options: no free whitespace (a weak or random model could pad forever)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _hoist_defs(functions: list[Function], arg_key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each function's object schema for one call, with its $defs moved to the root, where
    its "#/$defs/..." references resolve once the schema is nested."""
    defs: dict[str, Any] = {}
    items = []
    for f in functions:
        params = dict(f.parameters)
        for key in ("$defs", "definitions"):
            for name, schema in (params.pop(key, None) or {}).items():
                if (key, name) in defs and defs[(key, name)] != schema:
                    raise ParamError(f"two functions in tools define {key}/{name} differently; rename one "
                                     f"of them.", "tools")
                defs[(key, name)] = schema
        items.append({"type": "object", "properties": {"name": {"const": f.name}, arg_key: params},
                      "required": ["name", arg_key], "additionalProperties": False})
    root: dict[str, Any] = {}
    for (key, name), schema in defs.items():
        root.setdefault(key, {})[name] = schema
    return items, root


def call_schema(functions: list[Function], arg_key: str = "arguments") -> dict[str, Any]:
    """One call {"name": <a function>, arg_key: <its arguments>} as a JSON schema."""
    items, root = _hoist_defs(functions, arg_key)
    body = items[0] if len(items) == 1 else {"anyOf": items}
    return {**body, **root, "x-guidance": COMPACT}


def calls_array_schema(functions: list[Function], parallel: bool) -> dict[str, Any]:
    items, root = _hoist_defs(functions, "arguments")
    array: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                             "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return {**array, **root, "x-guidance": COMPACT}


Specials = Callable[[str], "int | None"]  # marker text -> its id where it is one special token


def _marker(text: str, specials: Specials) -> str:
    """A marker in Lark: the special token by id where the vocabulary has it as one (llguidance
    never lets plain text spell a special token), else the text."""
    special_id = specials(text)
    return f"<[{special_id}]>" if special_id is not None else json.dumps(text)


# A reply under tool_choice "auto": any non-empty text, as long as `~(...)` (llguidance's regex
# negation, intersected with valid UTF-8 text) keeps out what the format's splitter would read as
# a call. Excluding the marker's spelling is needed even where the marker is a special token:
# ordinary tokens can spell it, and the splitter reads decoded text.
_ANY = "/(?s:.*)/"


def _reply_text(markers: tuple[str, ...], leading: bool = False) -> str:
    """The TEXT terminal: no marker anywhere in it, or with `leading` none at its start
    (after whitespace), as Llama 3's splitter reads an answer that starts with one as calls."""
    head = "/[ \\t\\r\\n]*/" if leading else _ANY
    banned = " | ".join(f"({head} {json.dumps(m)} {_ANY})" for m in markers)
    return f"TEXT: /(?s:.+)/ & ~({banned})"


def _start(call: str, req: ToolRequest, markers: tuple[str, ...], leading: bool = False) -> str:
    """`start` for "required"/named: the call; for "auto": the call or a reply (TEXT).
    Text *then* a call is not offered: a free-text lexeme before a call does not work in llguidance."""
    if req.choice != "auto":
        return f"start: {call}"
    return f"start: {call} | TEXT\n{_reply_text(markers, leading)}"


def hermes_grammar(req: ToolRequest, specials: Specials) -> Grammar:
    """<tool_call>\\n{call}\\n</tool_call>, repeated (one per line) when parallel calls are allowed;
    under "auto", or a reply without "<tool_call>" in it."""
    schema = json.dumps(call_schema(req.callable()), ensure_ascii=False)
    calls = 'block ("\\n" block)*' if req.parallel else "block"
    block = f'{_marker("<tool_call>", specials)} "\\n" %json {schema} "\\n" {_marker("</tool_call>", specials)}'
    return Grammar("lark", f"{_start(calls, req, ('<tool_call>',))}\nblock: {block}")


def llama3_grammar(req: ToolRequest) -> Grammar:
    """One {"name": ..., "parameters": {...}} object (Llama 3.1 calls one function at a time);
    under "auto", or a reply that does not start with "{" or "<|python_tag|>"."""
    schema = json.dumps(call_schema(req.callable(), "parameters"), ensure_ascii=False)
    if req.choice != "auto":
        return Grammar("json_schema", schema)
    return Grammar("lark", f"{_start('call', req, ('{', PYTHON_TAG), leading=True)}\ncall: %json {schema}")


def mistral_grammar(req: ToolRequest, specials: Specials) -> Grammar:
    """[TOOL_CALLS] then a JSON array of calls; under "auto", or a reply without "[TOOL_CALLS]"."""
    schema = json.dumps(calls_array_schema(req.callable(), req.parallel), ensure_ascii=False)
    call = f"{_marker('[TOOL_CALLS]', specials)} %json {schema}"
    return Grammar("lark", f"{_start('call', req, ('[TOOL_CALLS]',))}\ncall: {call}")
