"""A choice's streamed output as OpenAI's chat deltas: reply text as {"content": ...}; each call
as {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} followed by
its arguments {"tool_calls": [{"index", "function": {"arguments": ...}}]}, in fragments as the
model writes them (incremental.py), or in one once the call is complete where it could not be
read as it came (arguments before the name, Mistral's name[ARGS]{...}). Joined, they are the non-streamed message of plan.ToolPlan.message."""
from __future__ import annotations

from typing import Any

from .calls import ToolCall
from .incremental import CallStart
from .plan import ToolPlan


class DeltaStream:
    def __init__(self, plan: ToolPlan):
        self.plan, self.splitter, self.index = plan, plan.splitter(), 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.splitter.feed(text)) if text else []

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self.splitter.finish())

    def finish_reason(self, finish: str | None) -> str | None:
        return self.plan.finish_reason(finish, self.index)

    def _deltas(self, events: list) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, (ToolCall, CallStart)):
                head = {"index": self.index, "id": e.id, "type": "function",
                        "function": {"name": e.name, "arguments": ""}}
                out.append({"tool_calls": [head]})
                self.index += 1
                if isinstance(e, ToolCall):
                    out.append(self._args(e.arguments))
            elif isinstance(e, str):
                out.append({"content": e})
            elif e.text:
                out.append(self._args(e.text))
        return out

    def _args(self, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index - 1, "function": {"arguments": text}}]}
