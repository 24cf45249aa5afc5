"""Which requests run in the next step, and how many tokens each computes (pure Python).

A request is "computed tokens catching up with known tokens": a decode has one token to
compute, a prefill many. Each step the scheduler
  1. gives every running decode its token (decodes first: a long prompt cannot stall streams),
  2. lets running prefills continue in chunks from what is left of the token budget,
  3. admits waiting requests first come, first served while `max_seqs` and the budget allow.
When the KV pool has no block for a running request, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
from its prompt and the tokens it had generated (vLLM's recompute preemption).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .request import Request


@dataclass
class Scheduled:
    req: Request
    n: int  # tokens to compute this step, from req.n_computed


class Scheduler:
    def __init__(self, max_seqs: int, max_batch_tokens: int,
                 reserve: Callable[[Request, int], bool], release: Callable[[Request], None],
                 chunked: bool = True):
        """reserve(req, n_tokens) makes room in the KV cache for n_tokens in all (False: full);
        release(req) frees a preempted request's cache. chunked=False computes whole
        sequences each step (no KV cache)."""
        self.max_seqs, self.budget = max_seqs, max_batch_tokens
        self.reserve, self.release, self.chunked = reserve, release, chunked
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finished(self) -> list[Request]:
        """Take out the requests that have a finish reason (done or cancelled)."""
        done = [r for r in self.running if r.finish_reason is not None]
        done += [r for r in self.waiting if r.finish_reason is not None]
        if done:
            self.running = [r for r in self.running if r.finish_reason is None]
            self.waiting = deque(r for r in self.waiting if r.finish_reason is None)
        return done

    def schedule(self) -> list[Scheduled]:
        budget, out = self.budget, []
        decodes = [r for r in self.running if r.n_known - r.n_computed == 1]
        prefills = [r for r in self.running if r.n_known - r.n_computed > 1]
        for req in decodes + prefills:
            if req not in self.running:  # preempted while making room for an earlier one
                continue
            n = self._size(req, budget)
            if n == 0:
                continue
            if not self._make_room(req, n):
                continue
            budget -= n
            out.append(Scheduled(req, n))
        out = [s for s in out if s.req in self.running]  # drop what a later preemption undid
        return out + self._admit(budget, chunk_ok=not any(s.n > 1 for s in out))

    def _admit(self, budget: int, chunk_ok: bool) -> list[Scheduled]:
        """Waiting requests, first come first served. A prompt that does not fit what is left of
        the budget waits for the next step rather than being cut, unless nothing else prefills
        now (then it is longer than any step can take and goes in chunks anyway): whole prompts
        keep a request's arithmetic the same however busy the engine is."""
        out = []
        while self.waiting and len(self.running) < self.max_seqs and budget > 0:
            req = self.waiting[0]
            self.reserve(req, 0)  # sets up its cache: prefix-cache hits advance n_computed
            n = self._size(req, budget)
            defer = n < req.n_known - req.n_computed and not chunk_ok
            if defer or not self.reserve(req, req.n_computed + n):
                self.release(req)  # give back the prefix blocks and what a partial reservation took
                req.n_computed = 0
                if not defer and not self.running:  # alone and too big for the pool: cannot grow
                    req.finish_reason = "length"
                break
            self.waiting.popleft()
            self.running.append(req)
            budget -= n
            chunk_ok = chunk_ok and n == 1
            out.append(Scheduled(req, n))
        return out

    def _size(self, req: Request, budget: int) -> int:
        todo = req.n_known - req.n_computed
        if not self.chunked or todo == 1:
            return todo
        images = getattr(req, "images", None)  # a chunk may not end inside an image seen both ways
        return min(todo, budget) if images is None else images.chunk(req.n_computed, min(todo, budget))

    def _make_room(self, req: Request, n: int) -> bool:
        """Reserve blocks for req, preempting the newest other running requests if needed;
        False when req itself had to be preempted."""
        while not self.reserve(req, req.n_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.n_computed = 0
        self.waiting.appendleft(req)
        self.preemptions += 1
