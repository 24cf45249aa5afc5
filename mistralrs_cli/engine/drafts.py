"""Draft sources for speculative decoding (speculative.py): a draft model with its own KV cache
per sequence (blocks of a pool of its own when the target's cache is paged, else contiguous), or
n-gram lookup in the sequence itself (no model).

A source proposes tokens for many sequences at once (`propose`), forgets positions the target
rejected (`rollback`) and drops a finished sequence (`release`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models.batch import SeqSlice
from .kv_cache import cache_for
from .request import Request
from .sampler import distribution, draw, greedy_token


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: list[Any] = field(default_factory=list)  # q of each token (None: the draft was certain)


def history(req: Request) -> list[int]:
    """The tokens the penalties look at, as Engine._advance passes them."""
    n, last = req.n_known, req.params.repeat_last_n
    return req.tokens(max(0, n - last) if last > 0 else 0, n)


class ModelDraft:
    """A small model of the same vocabulary; each sequence has a cache of its own that catches up
    with the sequence's known tokens in the first of the gamma draft passes. With a paged target
    (`target_kv`) the draft's caches are blocks of a pool of the draft's shape holding as many
    tokens as the target's; a sequence whose blocks run out drafts less this step."""

    def __init__(self, loaded, vocab: int, target_kv=None):
        self.model, self.vocab = loaded.model, vocab  # the target's logit rows: q never exceeds them
        self.max_context = loaded.max_context
        self.caches: dict[Request, object] = {}
        self.pool = None
        if target_kv is not None:
            from .paged import PagedKV, PoolShape

            c, m = self.model.config, self.model
            shape = PoolShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, m.cache_dtype)
            # no prefix cache: a draft's blocks are rebuilt cheaply and never shared
            self.pool = PagedKV(shape, target_kv.alloc.n_blocks, target_kv.block_size, 0, m.kv_round_to)

    def _new_cache(self):
        return self.pool.new_sequence([]) if self.pool is not None else cache_for(self.model)

    def _truncate(self, cache, n: int) -> None:
        if self.pool is not None:
            cache.set_length(min(n, len(cache)))
        else:
            cache.truncate(n)

    def _fits(self, cache, n_tokens: int) -> bool:
        return self.pool is None or cache.reserve(n_tokens)

    def room(self, req: Request) -> int:
        return self.max_context - req.n_known

    def behind(self, req: Request) -> int:
        """Rows the next proposal feeds this sequence's draft cache before its first draft token."""
        cache = self.caches.get(req)
        n = len(cache) if cache is not None else 0
        return req.n_known - n if n < req.n_known else 1

    def release(self, req: Request) -> None:
        cache = self.caches.pop(req, None)
        if cache is not None and self.pool is not None:
            cache.release(keep_prefix=False)

    def rollback(self, req: Request, n: int) -> None:
        cache = self.caches.get(req)
        if cache is not None:  # every layer: a failed pass may have left them uneven
            self._truncate(cache, n)

    def propose(self, reqs: list[Request], gammas: list[int]) -> dict:
        drafts = {r: Draft() for r in reqs}
        feeds = {}
        for r in reqs:
            cache = self.caches.get(r)
            if cache is None:
                cache = self.caches[r] = self._new_cache()
            if len(cache) >= r.n_known:  # always feed at least the last token: its logits are q
                self._truncate(cache, r.n_known - 1)
            feeds[r] = r.tokens(len(cache), r.n_known)
        active = list(zip(reqs, gammas))
        while active:  # pass 1 catches each cache up; later passes feed one draft token each
            ids, positions, seqs, rows = [], [], [], []
            active = [(r, g) for r, g in active if self._fits(self.caches[r], len(self.caches[r]) + len(feeds[r]))]
            if not active:
                break
            for r, _ in active:
                cache, toks, start = self.caches[r], feeds[r], len(ids)
                ids.extend(toks)
                positions.extend(range(len(cache), len(cache) + len(toks)))
                seqs.append(SeqSlice(start, start + len(toks), cache))
                rows.append(start + len(toks) - 1)
            logits = self.model.step(ids, positions, seqs, rows)
            more = []
            for (r, g), row in zip(active, logits):
                d = drafts[r]
                tok, q = self._draw(r, row[: self.vocab], d.tokens)
                d.tokens.append(tok)
                d.probs.append(q)
                if len(d.tokens) < g:
                    feeds[r] = [tok]
                    more.append((r, g))
            active = more
        return drafts

    @staticmethod
    def _draw(r: Request, logits, drafted: list[int]):
        """The draft's token and the distribution q it was drawn from (None when greedy)."""
        p, hist = r.params, history(r) + drafted
        if p.greedy:
            return greedy_token(logits, hist, p), None
        q = distribution(logits, hist, p)
        return draw(q, r.generator), q


class NgramDraft:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens."""

    def __init__(self, n: int):
        self.n = n

    def room(self, req: Request) -> int:
        return 1 << 30

    def release(self, req: Request) -> None:
        pass

    def rollback(self, req: Request, n: int) -> None:
        pass

    def propose(self, reqs: list[Request], gammas: list[int]) -> dict:
        return {r: Draft(*self._lookup(r.tokens(0, r.n_known), g)) for r, g in zip(reqs, gammas)}

    def _lookup(self, toks: list[int], g: int) -> tuple[list[int], list]:
        n = self.n
        if len(toks) <= n:
            return [], []
        arr = np.asarray(toks, dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every earlier n-gram
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size == 0:
            return [], []
        cont = toks[hits[-1] + n: hits[-1] + n + g]
        return cont, [None] * len(cont)
