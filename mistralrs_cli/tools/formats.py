"""The tool-call formats models are trained on, each as: how to recognise it in a chat
template, how to split the model's output into text and calls (stream.py), and the grammar that
makes the model write a valid call in it (grammars.py).

| format  | the model writes                                                     | templates        |
|---------|----------------------------------------------------------------------|------------------|
| hermes  | <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> (one per call) | Hermes 2/3, Qwen 2.5/3 |
| llama3  | {"name": ..., "parameters": {...}} (optionally after <|python_tag|>)   | Llama 3.1-3.3    |
| mistral | [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...} | Mistral v3+ |
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .calls import ToolCall, call_from, calls_from, json_values
from .stream import LeadingSplitter, MarkerSplitter, Splitter

PYTHON_TAG = "<|python_tag|>"


def parse_hermes_block(inner: str) -> list[ToolCall] | None:
    """The JSON between <tool_call> and </tool_call>."""
    try:
        call = call_from(json.loads(inner))
    except json.JSONDecodeError:
        return None
    return [call] if call else None


def parse_llama3(text: str) -> list[ToolCall] | None:
    """A whole answer of JSON call objects (after an optional <|python_tag|>)."""
    text = text.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG):]
    values = json_values(text)
    return calls_from(values, ("parameters", "arguments")) if values else None


def parse_mistral(rest: str) -> list[ToolCall] | None:
    """What follows [TOOL_CALLS]: a JSON array of calls (v3), or name[ARGS]{...} per call with
    [TOOL_CALLS] between them (v11)."""
    rest = rest.strip()
    if rest.startswith("[") or rest.startswith("{"):
        try:
            return calls_from(json.loads(rest), ("arguments", "parameters"))
        except json.JSONDecodeError:
            return None
    calls = []
    for part in rest.split("[TOOL_CALLS]"):
        name, sep, args = part.partition("[ARGS]")
        call = call_from({"name": name.strip(), "arguments": args.strip()}) if sep else None
        if call is None:
            return None
        calls.append(call)
    return calls or None


@dataclass(frozen=True)
class Format:
    name: str
    splitter: Callable[[], Splitter]


FORMATS = {
    "hermes": Format("hermes", lambda: MarkerSplitter("<tool_call>", "</tool_call>", parse_hermes_block,
                                                      stream_calls=True)),
    "llama3": Format("llama3", lambda: LeadingSplitter(("{", PYTHON_TAG), parse_llama3)),
    "mistral": Format("mistral", lambda: MarkerSplitter("[TOOL_CALLS]", None, parse_mistral, stream_calls=True)),
}


def detect(template_source: str) -> Format:
    """The format a template that renders tools teaches its model, from the markers it writes;
    Hermes's (the most common among open models) when it names none of them."""
    if "[TOOL_CALLS]" in template_source:
        return FORMATS["mistral"]
    if PYTHON_TAG in template_source or "ipython" in template_source:
        return FORMATS["llama3"]
    return FORMATS["hermes"]
