"""OpenAI response bodies: completions, chunks, usage and logprobs, as plain dicts."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ...engine.request import RequestOutput
from ...engine.token_text import TokenText


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


@dataclass
class ChoiceState:
    """What one choice has produced so far."""
    text: str = ""
    finish: str | None = None
    completion_tokens: int = 0
    prompt_time: float = 0.0
    decode_time: float = 0.0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat-style entries
    speculative: tuple[int, int, int] | None = None  # (draft tokens proposed, accepted, verify runs)

    def add(self, out: RequestOutput, entry: dict[str, Any] | None) -> None:
        self.text += out.text
        self.completion_tokens = out.completion_tokens
        self.prompt_time, self.decode_time = out.prompt_time, out.decode_time
        self.speculative = out.speculative or self.speculative
        if entry is not None:
            self.logprobs.append(entry)
        if out.finish_reason is not None:
            self.finish = out.finish_reason


def logprob_entry(out: RequestOutput, tt: TokenText) -> dict[str, Any] | None:
    """Chat's logprobs.content item for the token in `out` (None: no token or not asked)."""
    if out.token_id is None or out.logprob is None:
        return None
    tok, raw = tt(out.token_id)
    top = []
    for tid, lp in out.top_logprobs:
        s, b = tt(tid)
        top.append({"token": s, "logprob": lp, "bytes": b})
    return {"token": tok, "logprob": out.logprob, "bytes": raw, "top_logprobs": top}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel arrays, text offsets from `offset`."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def usage(prompt_tokens: int, choices: list[ChoiceState]) -> dict[str, Any]:
    c = sum(ch.completion_tokens for ch in choices)
    pt = max((ch.prompt_time for ch in choices), default=0.0)
    dt = max((ch.decode_time for ch in choices), default=0.0)
    use = {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c,
           "avg_prompt_tok_per_sec": prompt_tokens / pt if pt else 0.0,
           "avg_compl_tok_per_sec": c / dt if dt else 0.0,
           "total_prompt_time_sec": pt, "total_completion_time_sec": dt, "total_time_sec": pt + dt}
    spec = [ch.speculative for ch in choices if ch.speculative]
    if spec:  # speculative decoding's extra fields (engine/speculative.py)
        proposed, accepted, runs = (sum(x) for x in zip(*spec))
        use.update(speculative_draft_tokens=proposed, speculative_accepted_tokens=accepted,
                   speculative_acceptance_rate=accepted / proposed if proposed else 0.0,
                   speculative_mean_accepted_length=(accepted + runs) / runs if runs else 0.0)
    return use


def response(kind: str, rid: str, model: str, choices: list[ChoiceState], use: dict[str, Any],
             echo: list[str], n: int, want_logprobs: bool, tools: Any = None) -> dict[str, Any]:
    """tools: the request's tools.plan.ToolPlan; the text is then split into content and tool_calls."""
    out = []
    for i, ch in enumerate(choices):
        if kind == "chat":
            lp = {"content": ch.logprobs} if want_logprobs else None
            message, finish = ({"role": "assistant", "content": ch.text}, ch.finish) if tools is None \
                else tools.message(ch.text, ch.finish)
            out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            head = echo[i // n] if echo else ""
            lp = completion_logprobs(ch.logprobs, len(head)) if want_logprobs else None
            out.append({"index": i, "text": head + ch.text, "logprobs": lp, "finish_reason": ch.finish})
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": out,
            "usage": use}


def chunk(kind: str, rid: str, model: str, index: int, text: str | None, finish: str | None,
          entry: dict[str, Any] | None, want_logprobs: bool, role: bool = False,
          include_usage: bool = False, offset: int = 0, delta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed event for one choice (text None: no content in this event; a chat `delta`
    given, e.g. tool_calls, is sent as it is)."""
    if kind == "chat":
        delta = dict(delta or {})
        if role:
            delta = {"role": "assistant", **delta}
        if text is not None:
            delta["content"] = text
        lp = {"content": [entry] if entry else []} if want_logprobs and entry else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        lp = completion_logprobs([entry], offset) if want_logprobs and entry else None
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(kind: str, rid: str, model: str, use: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use}
