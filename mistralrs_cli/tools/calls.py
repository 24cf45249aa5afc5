"""One tool call as OpenAI's responses carry it, and reading calls out of JSON the model wrote."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def call_from(obj: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """{"name": ..., "arguments": {...}} (Llama 3 says "parameters") as a ToolCall, or None when
    the object is not a call. Arguments given as a JSON string are accepted too."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def calls_from(items: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> list[ToolCall] | None:
    """A JSON array of calls (or one call object) as ToolCalls; None if any item is not a call."""
    items = items if isinstance(items, list) else [items]
    calls = [call_from(x, arg_keys) for x in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def json_values(text: str, separators: str = " \t\r\n;") -> list[Any] | None:
    """The JSON values in text, one after another (separated by whitespace or ';', as Llama 3
    models write several calls); None unless the whole text is such values."""
    decoder, pos, out = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos] in separators:
            pos += 1
        if pos == len(text):
            return out or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        out.append(value)
