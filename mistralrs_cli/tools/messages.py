"""Chat messages that carry tool calls (assistant `tool_calls`) and tool results (role "tool"
with `tool_call_id`): checked, then shaped for the chat template.

Templates that render tools (Hermes/Qwen, Llama 3, Mistral) read `tool_calls[].function.arguments`
as an object (they `tojson` it), while OpenAI clients send it as a JSON string; as vLLM does, the
string is parsed back into the object before rendering. Templates that do not render tools get the
generic fallback's shapes (fallback.py)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..validation import ParamError


def _call(call: Any, i: int, k: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{k}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ParamError(f"{where} must be an object {{\"id\", \"type\": \"function\", \"function\": "
                         f"{{\"name\", \"arguments\"}}}}.", "messages")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ParamError(f"{where}.function.arguments must be a JSON object as a string, got "
                             f"{fn.get('arguments')!r:.80}.", "messages") from None
    if not isinstance(args, dict):
        raise ParamError(f"{where}.function.arguments must encode a JSON object.", "messages")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise ParamError(f"{where}.id must be a string.", "messages")
        out["id"] = call["id"]
    return out


def tool_fields(m: dict[str, Any], i: int) -> dict[str, Any]:
    """The tool-related fields of message i, checked: assistant tool_calls (arguments as
    objects), a tool message's tool_call_id, and a name where one is given."""
    extra: dict[str, Any] = {}
    calls = m.get("tool_calls")
    if calls is not None:
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise ParamError(f"messages[{i}].tool_calls must be an array on an assistant message.", "messages")
        if calls:
            extra["tool_calls"] = [_call(c, i, k) for k, c in enumerate(calls)]
    if m.get("role") == "tool":
        cid = m.get("tool_call_id")
        if not isinstance(cid, str):
            raise ParamError(f"messages[{i}] has role \"tool\" but no tool_call_id (a string naming the "
                             f"call it answers).", "messages")
        extra["tool_call_id"] = cid
    if isinstance(m.get("name"), str):
        extra["name"] = m["name"]
    return extra


def call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """tool_call_id -> function name, from the assistant messages' calls."""
    names = {}
    for m in messages:
        for c in m.get("tool_calls") or []:
            if "id" in c:
                names[c["id"]] = c["function"]["name"]
    return names


def _merge_same_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role joined: templates that insist on alternating roles
    would otherwise reject a tool result (now a user message) after a user message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "system":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def for_plain_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as plain role/content pairs, for a template that knows nothing of tools:
    an assistant's calls become the fallback's JSON answer {"tool_calls": [...]}, a tool
    result a user message {"tool_response": {...}}."""
    names = call_names(messages)
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif m["role"] == "tool":
            cid = m["tool_call_id"]
            result = {"tool_call_id": cid, "name": m.get("name") or names.get(cid, ""), "content": m["content"]}
            out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return _merge_same_roles(out)


def _nine(call_id: str) -> str:
    return hashlib.sha1(call_id.encode()).hexdigest()[:9]


def nine_char_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistral's templates refuse tool-call ids that are not 9 letters or digits ("call_..."
    from OpenAI clients, or ours): each id becomes the first 9 hex digits of its SHA-1, the
    same in the call and in the tool result that answers it (as vLLM shortens them)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": _nine(c["id"])} if "id" in c else c for c in m["tool_calls"]]}
        if m.get("role") == "tool":
            m = {**m, "tool_call_id": _nine(m["tool_call_id"])}
        out.append(m)
    return out
