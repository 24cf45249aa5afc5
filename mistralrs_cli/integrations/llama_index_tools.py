"""Messages and tool calls between llama-index's types and the Python API's OpenAI-shaped dicts
(for integrations/llama_index.py). llama-index keeps a tool call as a ToolCallBlock in the
assistant message's blocks (as its OpenAI integration does), and a tool result as a "tool"
message whose additional_kwargs carry tool_call_id."""
from __future__ import annotations

import json
from typing import Any, Sequence

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
          MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
          MessageRole.TOOL: "tool"}


def to_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """llama-index ChatMessages as the API's message dicts (text, tool calls, tool results)."""
    out = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise ValueError(f"messages[{i}].role is {m.role.value!r}; MistralRS takes system, user, assistant "
                             "and tool messages.")
        msg: dict[str, Any] = {"role": role, "content": m.content or ""}
        if role == "tool":
            msg["tool_call_id"] = m.additional_kwargs.get("tool_call_id")
        calls = [_openai_call(b) for b in m.blocks if isinstance(b, ToolCallBlock)]
        if role == "assistant" and calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _openai_call(block: ToolCallBlock) -> dict[str, Any]:
    args = block.tool_kwargs if isinstance(block.tool_kwargs, str) else json.dumps(block.tool_kwargs)
    return {"id": block.tool_call_id, "type": "function", "function": {"name": block.tool_name, "arguments": args}}


def assistant(text: str, tool_calls: list[dict[str, Any]] | None) -> ChatMessage:
    """The answer as a llama-index message: its text, then one ToolCallBlock per call."""
    blocks: list[Any] = [TextBlock(text=text)] if text else []
    for call in tool_calls or []:
        fn = call.get("function") or {}
        blocks.append(ToolCallBlock(tool_call_id=call.get("id"), tool_name=fn.get("name") or "",
                                    tool_kwargs=fn.get("arguments") or "{}"))
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks,
                       additional_kwargs={"tool_calls": tool_calls} if tool_calls else {})


class CallDeltas:
    """Streamed tool_calls deltas ({"index", "id", "function": {"name", "arguments" piece}}) joined."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: list[dict[str, Any]] | None) -> None:
        for d in deltas or []:
            call = self._calls.setdefault(d.get("index", 0), {"id": None, "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
            call["id"] = d.get("id") or call["id"]
            fn = d.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""

    def calls(self) -> list[dict[str, Any]]:
        return [self._calls[i] for i in sorted(self._calls)]


def chat_kwargs(tools: Sequence[Any], user_msg: Any, chat_history: list[ChatMessage] | None,
                parallel: bool, required: bool, tool_choice: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """chat()'s arguments for FunctionCallingLLM.chat_with_tools: the tools as OpenAI functions,
    tool_choice as OpenAI's (a bare function name becomes the named form)."""
    messages = list(chat_history or [])
    if user_msg is not None:
        messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
    specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
    if tool_choice is None:
        tool_choice = "required" if required else "auto"
    elif isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    if not specs:
        return {"messages": messages, **kwargs}
    return {"messages": messages, "tools": specs, "tool_choice": tool_choice, "parallel_tool_calls": parallel,
            **kwargs}


def selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The response's tool calls as llama-index ToolSelections (arguments parsed from JSON)."""
    out = []
    for block in response.message.blocks:
        if isinstance(block, ToolCallBlock):
            args = block.tool_kwargs
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except json.JSONDecodeError:
                    args = {}
            out.append(ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                                     tool_kwargs=args if isinstance(args, dict) else {}))
    if not out and error_on_no_tool_call:
        raise ValueError("Expected at least one tool call, but the model answered without one.")
    return out
