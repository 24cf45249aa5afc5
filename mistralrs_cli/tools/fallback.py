"""The generic fallback for chat templates that do not render `tools` (SmolLM2's, Gemma's), as
llama.cpp's server has one: the tools are described in the system message and the answer is
constrained to one JSON object, either

    {"tool_calls": [{"name": "<function>", "arguments": {...}}, ...]}   a call (or several), or
    {"content": "<reply text>"}                                          a reply to the user.

tool_choice "required" or a named function allow only the first shape (and only that
function); "auto" allows both. The arguments follow each function's `parameters` schema, so a
call always validates. Earlier calls go back to the model in the same JSON, and tool results as
user messages {"tool_response": {"tool_call_id", "name", "content"}} (messages.py)."""
from __future__ import annotations

import json
import re
from typing import Any

from ..types import Grammar
from .calls import ToolCall, calls_from
from .incremental import CallScanner
from .grammars import COMPACT, calls_array_schema
from .spec import ToolRequest
from .stream import Event, Splitter

_HEAD = re.compile(r'\s*\{\s*"(content|tool_calls)"\s*:\s*')


def schema(req: ToolRequest) -> dict[str, Any]:
    calls = calls_array_schema(req.callable(), req.parallel)
    extra = {k: calls.pop(k) for k in ("$defs", "definitions", "x-guidance") if k in calls}
    call_obj = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                "additionalProperties": False}
    if req.choice != "auto":
        return {**call_obj, **extra}
    reply = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
             "additionalProperties": False}
    return {"anyOf": [call_obj, reply], **extra}


def grammar(req: ToolRequest) -> Grammar:
    return Grammar("json_schema", json.dumps(schema(req), ensure_ascii=False))


def system_text(req: ToolRequest) -> str:
    tools = [{"name": f.name, "description": f.description, "parameters": f.parameters} for f in req.functions]
    call = '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}'
    lines = ["You can call these tools (functions); each is given with a JSON schema of its arguments:",
             json.dumps(tools, ensure_ascii=False), ""]
    if req.choice == "function":
        lines.append(f"Call the function {req.name}: answer with one JSON object, "
                     f'{{"tool_calls": [{{"name": "{req.name}", "arguments": {{<its arguments>}}}}]}}.')
    elif req.choice == "required":
        lines.append(f"Call one of the tools: answer with one JSON object, {call}.")
    else:
        lines += ["Answer with one JSON object and nothing else:",
                  f"- to call tools: {call}", '- to reply to the user: {"content": "<your reply>"}']
    lines.append('Tool results come back as {"tool_response": {...}} messages.')
    return "\n".join(lines)


def with_tools(messages: list[dict[str, Any]], req: ToolRequest) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message (appended to the client's
    own system message, or a new one first)."""
    text = system_text(req)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": (first["content"] + "\n\n" + text).lstrip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _string_prefix(s: str) -> tuple[str, bool]:
    """The JSON string body s (after its opening quote) decoded as far as it is complete, and
    whether its closing quote was reached; an escape cut in half waits for the rest."""
    i = 0
    while i < len(s):
        c = s[i]
        if c == '"':
            return json.loads('"' + s[:i] + '"', strict=False), True
        if c == "\\":
            step = 2
            if s[i + 1:i + 2] == "u":
                hi = s[i + 2:i + 6]
                step = 12 if re.fullmatch(r"[dD][89abAB][0-9a-fA-F]{2}", hi) else 6  # a surrogate pair
            if i + step > len(s):
                break
            i += step
            continue
        i += 1
    return json.loads('"' + s[:i] + '"', strict=False), False


class FallbackSplitter(Splitter):
    """{"content": "..."} streams its string as it is written, {"tool_calls": [...]} each call
    as it is written (incremental.py), else the calls are parsed when the answer ends; anything
    else (an answer cut short before it said which) is reply text as written."""

    def __init__(self) -> None:
        super().__init__()
        self.buf, self.mode, self.sent = "", "undecided", 0  # mode -> "content" | "calls" | "text"
        self.scanner = CallScanner()

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        if self.mode == "undecided":
            m = _HEAD.match(self.buf)
            if m and m.group(1) == "tool_calls":
                self.mode, self.start = "calls", m.end()
                text = self.buf[m.end():]
            elif m and self.buf[m.end():m.end() + 1] == '"':
                self.mode, self.start = "content", m.end() + 1
        if self.mode == "calls":
            return self._count(self.scanner.feed(text))
        if self.mode != "content":
            return []
        decoded, _ = _string_prefix(self.buf[self.start:])
        new, self.sent = decoded[self.sent:], len(decoded)
        return [new] if new else []

    def finish(self) -> list[Event]:
        try:
            obj = json.loads(self.buf)
        except json.JSONDecodeError:
            obj = None
        if self.mode == "content" or self.scanner.started:
            return []  # sent as it came (all of it, or all there was)
        calls = calls_from(obj.get("tool_calls")) if isinstance(obj, dict) and set(obj) == {"tool_calls"} else None
        if calls:
            return self._count(list(calls))
        if isinstance(obj, dict) and isinstance(obj.get("content"), str):
            return [obj["content"]]
        return [self.buf] if self.buf else []

