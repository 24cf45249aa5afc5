"""Per-sequence KV cache: per-layer buffers, head-major (Hkv, capacity, D), that grow by doubling.

Head-major keeps each head's keys contiguous, so attention multiplies the cache in place
(no per-step copy of the whole cache into the layout a batched matmul wants).

`round_to` stores values rounded through a narrower dtype (llama.cpp keeps its cache in f16)
while keeping them in the compute dtype, so attention never converts the whole cache per step.
Buffers are torch tensors for a torch dtype and numpy arrays for a numpy one (the native runtime)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .paged import empty


class SeqKVCache:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: Any = None,
                 capacity: int = 256, round_to: Any = None):
        if dtype is None:
            import torch

            dtype = torch.float32
        self.round_to = round_to
        self.k = [empty((n_kv, capacity, head_dim), dtype) for _ in range(n_layers)]
        self.v = [empty((n_kv, capacity, head_dim), dtype) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    def __len__(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k, v):
        """Append k, v (T, Hkv, D); return all keys and values so far, (Hkv, S, D) views."""
        n, t = self.lengths[layer], k.shape[0]
        if n + t > self.k[layer].shape[1]:
            cap = max(2 * self.k[layer].shape[1], n + t)
            for buf in (self.k, self.v):
                old = buf[layer]
                grown = empty((old.shape[0], cap, old.shape[2]), old.dtype)
                grown[:, :n] = old[:, :n]
                buf[layer] = grown
        if isinstance(k, np.ndarray):
            if self.round_to is not None:
                k, v = k.astype(self.round_to), v.astype(self.round_to)
            self.k[layer][:, n:n + t] = k.transpose(1, 0, 2)
            self.v[layer][:, n:n + t] = v.transpose(1, 0, 2)
        else:
            if self.round_to is not None:
                k, v = k.to(self.round_to), v.to(self.round_to)
            self.k[layer][:, n:n + t] = k.transpose(0, 1)
            self.v[layer][:, n:n + t] = v.transpose(0, 1)
        self.lengths[layer] = n + t
        return self.k[layer][:, : n + t], self.v[layer][:, : n + t]

    def native_slots(self, layer: int, t: int) -> tuple[int, int, int, int, int]:
        """As PagedSeqCache.native_slots (numpy buffers): room for t more positions, and where the
        whole keys and values are for the native kernels to write and read."""
        n = self.lengths[layer]
        if n + t > self.k[layer].shape[1]:
            cap = max(2 * self.k[layer].shape[1], n + t)
            for buf in (self.k, self.v):
                grown = empty((buf[layer].shape[0], cap, buf[layer].shape[2]), buf[layer].dtype)
                grown[:, :n] = buf[layer][:, :n]
                buf[layer] = grown
        self.lengths[layer] = n + t
        k, v = self.k[layer], self.v[layer]
        return k.ctypes.data, v.ctypes.data, n + t, k.shape[1] * k.shape[2], k.shape[2]

    @property
    def dtype(self):
        return self.k[0].dtype

    def native_layers_ok(self) -> bool:
        return True

    def native_layers(self, t: int):
        """As PagedSeqCache.native_layers: room for t more positions in every layer, and the
        addresses (int64 arrays over the layers), S, head stride and slot stride."""
        for layer in range(len(self.k)):
            where = self.native_slots(layer, t)
        k = np.fromiter((a.ctypes.data for a in self.k), dtype=np.int64, count=len(self.k))
        v = np.fromiter((a.ctypes.data for a in self.v), dtype=np.int64, count=len(self.v))
        return k, v, where[2], where[3], where[4]

    def truncate(self, n: int) -> None:
        self.lengths = [min(x, n) for x in self.lengths]


def cache_for(model) -> SeqKVCache:
    """An empty cache shaped for `model`, in its cache dtype, rounded as its kv_round_to says."""
    c = model.config
    return SeqKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, model.cache_dtype,
                      round_to=model.kv_round_to)
