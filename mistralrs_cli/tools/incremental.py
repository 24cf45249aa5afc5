"""Calls streamed while they are written: a call object {"name": "...", "arguments": {...}}
(Llama 3 says "parameters") is announced once its name is complete, then its arguments go out
fragment by fragment as the model writes them, until their object closes. Several calls in a
row (a JSON array, or one per Hermes block) are scanned one after another.

Only calls whose name comes first and whose arguments are an object stream this way (every call
generated under a grammar does); anything else is left to the splitter's parse at the end."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .calls import new_call_id

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_BETWEEN = " \t\r\n}],;["  # what may separate one call object from the next


@dataclass(frozen=True)
class CallStart:
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    text: str


class CallScanner:
    def __init__(self) -> None:
        self.buf, self.pos, self.state = "", 0, "head"  # -> "args" | "off"
        self.depth, self.in_str, self.escaped = 0, False, False
        self.started = 0  # calls announced

    def feed(self, text: str) -> list:
        self.buf += text
        events: list = []
        while self.state != "off":
            if self.state == "head" and not self._head(events):
                break
            if self.state == "args" and not self._args(events):
                break
        return events

    def _head(self, events: list) -> bool:
        """Announce the next call once its name and the start of its arguments are there."""
        while self.pos < len(self.buf) and self.buf[self.pos] in _BETWEEN:
            self.pos += 1
        m = _HEAD.match(self.buf, self.pos)
        if m is None or m.end() == len(self.buf):
            if len(self.buf) - self.pos > 4096 or (self.pos < len(self.buf) and self.buf[self.pos] != "{"):
                self.state = "off"  # not a call object this scanner reads
            return False
        if self.buf[m.end()] != "{":
            self.state = "off"
            return False
        try:
            name = json.loads('"' + m.group(1) + '"')
        except json.JSONDecodeError:
            self.state = "off"
            return False
        events.append(CallStart(new_call_id(), name))
        self.started += 1
        self.pos, self.state, self.depth = m.end(), "args", 0
        return True

    def _args(self, events: list) -> bool:
        """Arguments text up to where their object closes; True when it did."""
        start = self.pos
        while self.pos < len(self.buf):
            c = self.buf[self.pos]
            self.pos += 1
            if self.in_str:
                self.escaped, self.in_str = (not self.escaped and c == "\\"), (self.escaped or c != '"')
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    events.append(ArgsDelta(self.buf[start:self.pos]))
                    self.state = "head"
                    return True
        if self.pos > start:
            events.append(ArgsDelta(self.buf[start:self.pos]))
        return False
