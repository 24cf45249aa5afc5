"""Rank 0's model as the engine sees it, and the loop the other ranks run.

Rank 0's engine calls `TPModel.step` as it would a model's: the step's inputs (token ids,
positions, logits rows, and each sequence's cache as block ids and length) go to every rank,
then all ranks run the same sharded forward pass. Each rank's paged KV pool holds its own KV
heads in the same blocks, so rank 0's block tables (and prefix-cache copies) address every
rank's pool.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from typing import Any

from .comm import Comm

log = logging.getLogger(__name__)
_keys = itertools.count()


class Unsupported(Exception):
    pass


class TPModel:
    """The sharded model on rank 0: a model to the engine, a sender to the other ranks."""

    def __init__(self, model, comm: Comm):
        self.inner, self.comm = model, comm
        plan = model.tp_plan
        # the engine sizes its KV pool and caches from this: this rank's KV heads
        self.config = dataclasses.replace(model.config, num_key_value_heads=plan.local_kv)
        self.fault_hooks = comm.fault_hooks  # engine/worker.py: a lost rank fails the engine thread
        self._pool = None
        self._copies: list[tuple[list[int], list[int]]] = []
        self._freed: list[int] = []

    def __getattr__(self, name: str) -> Any:  # dtype, cache_dtype, kv_round_to, ...: the model's
        return getattr(self.inner, name)

    def modules(self):
        """Rewriting the modules in place (the server's re_isq) would change rank 0's slices only."""
        from ..errors import UserError

        raise UserError("quantizing in place is not available with --tp; load the model with --isq instead.")

    named_modules = parameters = modules

    def step(self, ids, positions, seqs, rows, hidden: bool = False, adapter_weights=None, input_embeds=None):
        descs = [(s.start, s.end, self._describe(s.cache)) for s in seqs]
        pool = None if self._pool is None else (self._pool.alloc.n_blocks, self._pool.block_size)
        copies, self._copies = self._copies, []
        freed, self._freed = self._freed, []
        # the rows' LoRA weights (adapters/bank.py) go with the step: every rank's side paths weigh
        # them; so do the image rows (vision: the tower runs on rank 0, every rank's layers take them)
        msg = ("step", ids, positions, rows, hidden, descs, pool, copies, freed, adapter_weights, input_embeds)
        with self.comm.lock:
            try:
                self.comm.send(msg)
                return self.inner.step(ids, positions, seqs, rows, hidden=hidden, adapter_weights=adapter_weights,
                                       input_embeds=input_embeds)
            except Exception as e:  # a lost rank, or ranks out of step: nothing can continue
                self.comm.collective_failed(e)
                raise

    def _describe(self, cache) -> tuple | None:
        from ..engine.kv_cache import SeqKVCache
        from ..engine.paged import PagedSeqCache

        if cache is None:
            return None
        if isinstance(cache, PagedSeqCache):
            if self._pool is not cache.kv:
                self._pool = cache.kv
                cache.kv.on_copy = lambda found, fresh: self._copies.append((list(found), list(fresh)))
            return ("paged", list(cache.blocks), len(cache))
        if isinstance(cache, SeqKVCache):
            key = getattr(cache, "tp_key", None)
            if key is None:
                key = cache.tp_key = next(_keys)
                weakref.finalize(cache, self._freed.append, key)
            return ("seq", key, len(cache))
        raise Unsupported(f"a {type(cache).__name__} cache under --tp")


class Mirror:
    """A follower's caches: the paged pool rank 0 addresses by block, or per-sequence caches."""

    def __init__(self, model):
        self.model = model
        self.pool = None
        self.seqs: dict[int, Any] = {}

    def apply(self, pool, copies, freed) -> None:
        from ..engine.paged import PagedKV, PoolShape

        if pool is not None and self.pool is None:
            c, plan = self.model.config, self.model.tp_plan
            shape = PoolShape(c.num_hidden_layers, plan.local_kv, c.head_dim, self.model.cache_dtype)
            self.pool = PagedKV(shape, pool[0], pool[1], 0, self.model.kv_round_to)
        for found, fresh in copies:  # as PagedKV._contiguous_copy did on rank 0
            bs = self.pool.block_size
            src = [b * bs + j for b in found for j in range(bs)]
            s0, n = fresh[0] * bs, len(found) * bs
            for t in self.pool.kv:
                t[:, s0:s0 + n] = t[:, src]
        for key in freed:
            self.seqs.pop(key, None)

    def cache(self, desc):
        from ..engine.kv_cache import SeqKVCache
        from ..engine.paged import PagedSeqCache

        if desc is None:
            return None
        if desc[0] == "paged":
            c = PagedSeqCache(self.pool)
            c.blocks = desc[1]
            c.set_length(desc[2])
            return c
        _, key, n = desc
        c = self.seqs.get(key)
        if c is None:
            cfg, plan = self.model.config, self.model.tp_plan
            c = self.seqs[key] = SeqKVCache(cfg.num_hidden_layers, plan.local_kv, cfg.head_dim,
                                            self.model.cache_dtype, round_to=self.model.kv_round_to)
        c.truncate(n)
        return c


def follow(model, comm: Comm) -> None:
    """Run rank 0's steps until it says stop."""
    from ..models.batch import SeqSlice

    mirror = Mirror(model)
    while True:
        try:
            msg = comm.recv()
        except Exception as e:  # noqa: BLE001 - rank 0 is gone (its channel closed)
            if comm.stopping:
                return
            comm.fault(0, f"is gone (the step channel closed: {type(e).__name__})")
        if msg[0] == "stop":
            comm.stopped()
            return
        _, ids, positions, rows, hidden, descs, pool, copies, freed, adapter_weights, input_embeds = msg
        try:
            mirror.apply(pool, copies, freed)
            seqs = [SeqSlice(a, b, mirror.cache(d)) for a, b, d in descs]
            model.step(ids, positions, seqs, rows, hidden=hidden, adapter_weights=adapter_weights,
                       input_embeds=input_embeds)
        except Exception as e:  # noqa: BLE001
            comm.collective_failed(e)
