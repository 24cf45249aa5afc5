"""Splitting a model's output, as it streams, into reply text and tool calls.

A splitter is fed text deltas and returns events: a string (reply text to send now), a
ToolCall (complete, with its arguments), or a call streamed as it is written: CallStart (id and
name), then ArgsDelta fragments of its arguments (incremental.py). The non-streamed answer is the same splitter fed the
whole text at once, so a stream's deltas always reassemble to the non-streamed message. Text
that might be the start of a tool-call marker is held back until it is known not to be one, so
no markup leaks into the reply; whitespace next to a call is dropped."""
from __future__ import annotations

from typing import Callable, Union

from .calls import ToolCall
from .incremental import ArgsDelta, CallScanner, CallStart

Event = Union[str, ToolCall, CallStart, ArgsDelta]


class Splitter:
    """Plain text: everything is reply text (tool_choice "none", or no tools)."""

    def __init__(self) -> None:
        self.calls = 0  # how many calls were emitted

    def feed(self, text: str) -> list[Event]:
        return [text] if text else []

    def finish(self) -> list[Event]:
        return []

    def _count(self, events: list[Event]) -> list[Event]:
        self.calls += sum(isinstance(e, (ToolCall, CallStart)) for e in events)
        return [e for e in events if not (isinstance(e, str) and not e)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper start of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class MarkerSplitter(Splitter):
    """Reply text with calls between an opening marker and a closing one (Hermes/Qwen
    "<tool_call>{...}</tool_call>"), or after an opening marker up to the end (close None:
    Mistral's "[TOOL_CALLS] [...]"). `parse` turns a call's text into calls, or None when it is
    not one: then it stays reply text, markers and all. With `stream_calls` a call between the
    markers is streamed as it is written (incremental.py) and no longer parsed at its end."""

    def __init__(self, open_: str, close: str | None, parse: Callable[[str], list[ToolCall] | None],
                 stream_calls: bool = False):
        super().__init__()
        self.open, self.close, self.parse, self.stream_calls = open_, close, parse, stream_calls
        self.buf, self.in_call, self.after_call = "", False, False
        self.scanner, self.fed = CallScanner(), 0  # the current call's scanner, and what it was fed

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        events: list[Event] = []
        while True:
            if self.after_call and not self.in_call:  # whitespace after a call is dropped
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.after_call = False
            if not self.in_call:
                at = self.buf.find(self.open)
                if at < 0:
                    events.append(self._release())
                    break
                events.append(self.buf[:at].rstrip())
                self.buf, self.in_call = self.buf[at + len(self.open):], True
                self.scanner, self.fed = CallScanner(), 0
            elif self.close is not None and (at := self.buf.find(self.close)) >= 0:
                events += self._block(self.buf[:at], self.close)
                self.buf, self.in_call, self.after_call = self.buf[at + len(self.close):], False, True
            else:
                events += self._scan(len(self.buf) - _partial_suffix(self.buf, self.close or "\0"))
                break
        return self._count(events)

    def _scan(self, upto: int) -> list[Event]:
        """The call's text so far (none of it a closing marker) to the scanner."""
        if not self.stream_calls or upto <= self.fed:
            return []
        events = self.scanner.feed(self.buf[self.fed:upto])
        self.fed = upto
        return events

    def _release(self) -> str:
        """The text that cannot begin a marker; held back: a partial marker and the whitespace
        before it (dropped if a call follows)."""
        keep = _partial_suffix(self.buf, self.open)
        head = self.buf[:len(self.buf) - keep]
        body = head.rstrip()
        self.buf = self.buf[len(body):]
        return body

    def _block(self, inner: str, close: str) -> list[Event]:
        streamed = self._scan(len(inner))
        if self.scanner.started:  # announced already: the rest of its arguments, no parse
            return streamed
        calls = self.parse(inner)
        return list(calls) if calls else [self.open + inner + close]

    def finish(self) -> list[Event]:
        if self.in_call:
            events = self._block(self.buf, "")
        elif self.calls and not self.buf.strip():
            events = []
        else:
            events = [self.buf]
        self.buf, self.in_call = "", False
        return self._count(events)


class LeadingSplitter(Splitter):
    """A whole answer that is calls when it starts with one of `starts` (after whitespace), as
    Llama 3 answers with a JSON object (or "<|python_tag|>" and one); anything else is reply
    text, streamed as it comes. Calls stream as they are written (incremental.py), or are
    parsed when the answer ends."""

    def __init__(self, starts: tuple[str, ...], parse: Callable[[str], list[ToolCall] | None]):
        super().__init__()
        self.starts, self.parse = starts, parse
        self.buf, self.mode, self.scanner = "", "undecided", CallScanner()  # mode -> "text" | "calls"

    def feed(self, text: str) -> list[Event]:
        if self.mode == "text":
            return self._count([text])
        self.buf += text
        if self.mode == "calls":
            return self._count(self.scanner.feed(text))
        head = self.buf.lstrip()
        start = next((s for s in self.starts if head.startswith(s)), None)
        if start is not None:
            self.mode = "calls"
            return self._count(self.scanner.feed(head[len(start):] if start != "{" else head))
        if not head or any(s.startswith(head) for s in self.starts):
            return []
        self.mode, out, self.buf = "text", self.buf, ""
        return self._count([out])

    def finish(self) -> list[Event]:
        text, self.buf = self.buf, ""
        if self.mode != "calls":
            return self._count([text])
        if self.scanner.started:
            return []
        calls = self.parse(text)
        return self._count(list(calls) if calls else [text])


def assemble(events: list[Event]) -> tuple[str, list[dict]]:
    """Events joined: the reply text and OpenAI's tool_calls list."""
    text, calls = "", []
    for e in events:
        if isinstance(e, str):
            text += e
        elif isinstance(e, ToolCall):
            calls.append(e.to_dict())
        elif isinstance(e, CallStart):
            calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
        else:
            calls[-1]["function"]["arguments"] += e.text
    return text, calls
