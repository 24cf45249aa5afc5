"""The engine: requests in, RequestOutput deltas out. One step = schedule -> forward -> sample.

A request is "computed tokens catching up with known tokens": a prompt is prefilled in chunks
under a token budget, then each step adds one token. All scheduled sequences run in one
flattened forward pass, so prefills and decodes of different requests mix in one step.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Iterator

import torch

from ..errors import UserError
from ..models.layers import Batch, SeqSlice
from ..types import EngineConfig, SamplingParams
from .kv_cache import cache_for
from .request import Request, RequestOutput
from .sampler import sample

_ids = itertools.count()


class Engine:
    def __init__(self, loaded, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.cfg = config or EngineConfig()
        self.max_context = loaded.max_context
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ---- requests in ----
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        rid = request_id or f"req-{next(_ids)}"
        prompt_ids = self._fit_prompt(list(prompt_ids))
        req = Request(rid, prompt_ids, params, detok=self.tokenizer.stream())
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        self.waiting.append(req)
        return req

    def _fit_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise UserError("the prompt is empty after tokenization; send some text.")
        if len(ids) >= self.max_context:
            if not self.cfg.truncate_sequence:
                raise UserError(f"the prompt has {len(ids)} tokens but the model's context is "
                                f"{self.max_context}; shorten it or pass --truncate-sequence.")
            ids = ids[-(self.max_context - 1):]
        return ids

    def abort(self, request_id: str) -> None:
        for req in list(self.waiting) + self.running:
            if req.id == request_id and req.finish_reason is None:
                req.finish_reason = "cancelled"

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        outputs = self._reap()
        for req in [r for r in self.waiting if r.params.max_tokens == 0]:
            self.waiting.remove(req)  # nothing to generate: finish without computing
            req.finish_reason = "length"
            outputs.append(self._final(req))
        while self.waiting and len(self.running) < self.cfg.max_seqs:
            req = self.waiting.popleft()
            if req.finish_reason is None:
                req.t_scheduled = time.perf_counter()
                self.running.append(req)
            else:
                outputs.append(self._final(req))
        if not self.running:
            return outputs
        ids, positions, seqs, sampled_reqs, rows = [], [], [], [], []
        budget = self.cfg.max_batch_tokens
        for req in self.running:
            if self.cfg.no_kv_cache:
                req.n_computed, req.cache = 0, None
            elif req.cache is None:
                req.cache = cache_for(self.model)
            todo = req.n_known - req.n_computed
            n = todo if (todo == 1 or self.cfg.no_kv_cache) else min(todo, max(budget, 1))
            budget -= n
            start = len(ids)
            ids.extend(req.tokens(req.n_computed, req.n_computed + n))
            positions.extend(range(req.n_computed, req.n_computed + n))
            seqs.append(SeqSlice(start, start + n, req.cache))
            req.n_computed += n
            if req.n_computed == req.n_known:
                sampled_reqs.append(req)
                rows.append(start + n - 1)
        batch = Batch(torch.tensor(positions), seqs, torch.tensor(rows))
        with torch.inference_mode():
            logits = self.model(torch.tensor(ids), batch)
        for req, row in zip(sampled_reqs, logits):
            outputs.append(self._advance(req, row))
        return outputs

    def _reap(self) -> list[RequestOutput]:
        done = [r for r in self.running if r.finish_reason is not None]
        self.running = [r for r in self.running if r.finish_reason is None]
        return [self._final(r) for r in done if r.finish_reason == "cancelled"]

    def _advance(self, req: Request, logits: torch.Tensor) -> RequestOutput:
        p = req.params
        start = max(0, req.n_known - p.repeat_last_n) if p.repeat_last_n > 0 else 0
        history = req.tokens(start, req.n_known)
        s = sample(logits, history, p, req.generator)
        if req.t_first is None:
            req.t_first = time.perf_counter()
        tok = s.token
        stop_tok = (not p.ignore_eos and tok in self.loaded.eos_ids) or tok in p.stop_token_ids
        req.output_ids.append(tok)
        if stop_tok:
            req.finish_reason = "stop"
            return self._emit(req, tok, s, flush=True)
        req.text += req.detok.push(tok)
        if self._match_stop(req):
            req.finish_reason = "stop"
            return self._emit(req, tok, s, flush=False)
        if (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens) or req.n_known >= self.max_context:
            req.finish_reason = "length"
            return self._emit(req, tok, s, flush=True)
        return self._emit(req, tok, s, flush=False)

    def _match_stop(self, req: Request) -> bool:
        """Cut the text at the first stop string; otherwise hold back a possible stop prefix."""
        stops = req.params.stop
        if not stops:
            req.hold = 0
            return False
        look = max(0, req.emitted - max(map(len, stops)))
        hits = [i for i in (req.text.find(s, look) for s in stops) if i >= 0]
        if hits:
            req.text = req.text[: min(hits)]
            req.hold = 0
            return True
        req.hold = max((k for s in stops for k in range(1, len(s)) if req.text.endswith(s[:k])), default=0)
        return False

    def _emit(self, req: Request, tok: int | None, s, flush: bool) -> RequestOutput:
        if flush:
            req.text += req.detok.flush()
            req.hold = 0
        end = len(req.text) - req.hold
        delta, req.emitted = req.text[req.emitted:end], max(req.emitted, end)
        pt, dt = req.timing()
        return RequestOutput(
            req.id, tok, delta, req.finish_reason,
            logprob=s.logprob if s is not None and req.params.logprobs else None,
            top_logprobs=s.top if s is not None else [],
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            prompt_time=pt, decode_time=dt,
        )

    def _final(self, req: Request) -> RequestOutput:
        return self._emit(req, None, None, flush=False)

    # ---- convenience: run one request to the end on this thread ----
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        req = self.add_request(prompt_ids, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == req.id:
                        yield out
                        if out.finish_reason is not None:
                            return
        finally:
            if req.finish_reason is None:
                self.abort(req.id)
                self._reap()
