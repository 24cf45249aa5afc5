"""A request's state inside the engine, and the deltas it streams out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..types import SamplingParams


@dataclass
class RequestOutput:
    """One step's news about one request: a token and its text delta, or the end."""

    request_id: str
    token_id: int | None
    text: str  # text delta (may be "" while a stop string or a UTF-8 sequence is pending)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_time: float = 0.0  # seconds from scheduling to the first token
    decode_time: float = 0.0  # seconds from the first token to this one
    error: BaseException | None = None  # with finish_reason "error": what failed this request
    # speculative decoding so far: (draft tokens proposed, accepted, verify runs), None without it
    speculative: tuple[int, int, int] | None = None


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    n_computed: int = 0  # tokens whose keys/values are in the cache
    cache: Any = None
    detok: Any = None  # the tokenizer's StreamDecoder
    text: str = ""  # all generated text so far
    emitted: int = 0  # characters of `text` already sent
    hold: int = 0  # trailing characters held back: they may begin a stop string
    generator: Any = None  # the request's numpy Generator when it has a seed
    finish_reason: str | None = None
    final_sent: bool = False  # the output carrying finish_reason went out
    t_scheduled: float | None = None
    t_first: float | None = None
    spec_counts: tuple[int, int, int] | None = None  # speculative decoding: RequestOutput.speculative
    images: Any = None  # vision/prompt.py PromptImages: the prompt rows that are image features
    grammar: Any = None  # grammar/matcher.SeqGrammar when params.grammar is set

    @property
    def n_known(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end) without copying the whole sequence each step."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    def timing(self) -> tuple[float, float]:
        now = time.perf_counter()
        if self.t_first is None:
            return (now - self.t_scheduled if self.t_scheduled else 0.0), 0.0
        return self.t_first - (self.t_scheduled or self.t_first), now - self.t_first
