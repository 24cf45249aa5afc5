"""X-LoRA's two passes inside one engine step, per sequence under continuous batching.

For the X-LoRA sequences of a step (those whose request names no adapters: `adapters` None), a
scaling pass first runs their new tokens with every adapter weighed by scaling_pass_value, on a
second KV cache of their own (with scaling_pass_value 0 that pass is the base model, so its cache
is the base model's cache); the classifier turns that pass's final hidden states into per-token
scalings, which become those rows' adapter weights in the step's real pass. Other sequences in the
same step keep their own weights. A sequence's scaling-pass cache is freed with the sequence.

--tgt-non-granular-index N (mistral.rs's non-granular scalings): the scaling pass runs for the
prompt and the first N generated tokens; the scalings of the N-th (of the prompt's last token
with N = 0) are then reused for every later token, and the scaling pass is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.batch import SeqSlice
from .kv_cache import cache_for


@dataclass
class _SeqState:
    cache: Any  # the scaling pass's own KV cache (None with --no-kv-cache)
    fixed: np.ndarray | None = None  # (n_slots, n_adapters): the non-granular weights, once known


class XLoraStep:
    def __init__(self, model, classifier, bank, no_kv_cache: bool = False,
                 tgt_non_granular_index: int | None = None):
        self.model, self.clf, self.no_kv_cache = model, classifier, no_kv_cache
        self.tgt = tgt_non_granular_index
        self.shape = (bank.n_slots, len(bank.names))
        self.index = np.asarray([bank.index(n) for n in classifier.config.adapters], dtype=np.int64)
        self.state: dict[str, _SeqState] = {}
        self.record: dict[str, list[np.ndarray]] | None = None  # set to {} to keep every row's scalings
        self.scaling_rows = 0  # rows the scaling pass has run, since start

    @staticmethod
    def uses(req) -> bool:
        """A request that names no adapters runs the X-LoRA model."""
        return req.params.adapters is None

    def release(self, req) -> None:
        self.state.pop(req.id, None)

    def fill(self, weights: np.ndarray | None, work: list, T: int) -> np.ndarray | None:
        """The step's adapter weights (n_slots, T, n_adapters) with the X-LoRA rows filled in;
        `work` is the step's scheduled chunks in batch order, `weights` what other adapters set."""
        jobs, row0 = [], 0
        for w in work:
            if self.uses(w.req):
                jobs.append((w.req, row0, w.n))
            row0 += w.n
        if not jobs:
            return weights
        if weights is None:
            weights = np.zeros((self.shape[0], T, self.shape[1]), dtype=np.float32)
        plans = [self._plan(req, n) for req, _, n in jobs]
        hidden = self._scaling_pass([req for req, _, _ in jobs], plans)
        at = 0
        for (req, row0, n), (st, a, start, limit) in zip(jobs, plans):
            k = max(0, limit - a)
            h, at = hidden[at:at + k], at + k
            self._apply(weights, req, st, h[start - a:] if k else h, row0, start, n)
        return weights

    def _plan(self, req, n: int) -> tuple[_SeqState, int, int, int]:
        """(state, first position the scaling pass feeds, chunk start, end of the scaling pass)."""
        st = self.state.get(req.id)
        if st is None:
            st = self.state[req.id] = _SeqState(None if self.no_kv_cache else cache_for(self.model))
        start, end = req.n_computed, req.n_computed + n
        limit = end if self.tgt is None else min(end, len(req.prompt_ids) + self.tgt)
        if st.cache is None:
            a = 0  # no cache: the whole sequence again
        else:
            if len(st.cache) > start:  # recomputed after a preemption or a failed step
                st.cache.truncate(start)
            a = len(st.cache)  # below start after a prefix-cache hit: catch up from there
        if limit <= start:  # past the non-granular index: no scaling pass at all
            return st, a, start, a
        return st, a, start, limit

    def _scaling_pass(self, reqs: list, plans: list) -> np.ndarray:
        """One forward over every sequence's scaling-pass rows -> their final hidden states."""
        ids, positions, seqs = [], [], []
        for req, (st, a, _, limit) in zip(reqs, plans):
            if limit > a:
                seqs.append(SeqSlice(len(ids), len(ids) + limit - a, st.cache))
                ids.extend(req.tokens(a, limit))
                positions.extend(range(a, limit))
        if not ids:
            return np.zeros((0, 0), dtype=np.float32)
        self.scaling_rows += len(ids)
        w = self.clf.scaling_pass_weights(len(ids))
        kw = {} if w is None else {"adapter_weights": self._widen(w)}
        return self.model.step(ids, positions, seqs, [], hidden=True, **kw)

    def _widen(self, w: np.ndarray) -> np.ndarray:
        """Classifier-order weights (n_slots, T, n_classes) -> the bank's (n_slots, T, n_adapters)."""
        if len(self.index) == self.shape[1] and np.array_equal(self.index, np.arange(self.shape[1])):
            return w
        out = np.zeros((self.shape[0], w.shape[1], self.shape[1]), dtype=np.float32)
        out[:, :, self.index] = w
        return out

    def _apply(self, weights: np.ndarray, req, st: _SeqState, hidden: np.ndarray, row0: int,
               start: int, n: int) -> None:
        """Write this chunk's rows: classifier weights up to the non-granular limit, then the fixed ones."""
        k = hidden.shape[0]  # rows [start, start + k) have fresh scalings
        if k:
            scalings = self.clf.scalings(hidden)
            if self.record is not None:
                self.record.setdefault(req.id, []).append(scalings)
            w = self.clf.adapter_weights(scalings)  # (n_slots, k, n_classes)
            weights[:, row0:row0 + k][:, :, self.index] = w  # (a view: written in place)
            if self.tgt is not None and start + k == len(req.prompt_ids) + self.tgt:
                st.fixed = w[:, -1].copy()
        if k < n:
            if st.fixed is None:
                raise RuntimeError(f"X-LoRA request {req.id} reached its non-granular scalings before computing them")
            weights[:, row0 + k:row0 + n][:, :, self.index] = st.fixed[:, None, :]
