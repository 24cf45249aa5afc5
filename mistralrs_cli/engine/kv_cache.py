"""Per-sequence KV cache: per-layer buffers, head-major (Hkv, capacity, D), that grow by doubling.

Head-major keeps each head's keys contiguous, so attention multiplies the cache in place
(no per-step copy of the whole cache into the layout a batched matmul wants).

`round_to` stores values rounded through a narrower dtype (llama.cpp keeps its cache in f16)
while keeping them in the compute dtype, so attention never converts the whole cache per step."""
from __future__ import annotations

import torch


class SeqKVCache:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 capacity: int = 256, round_to: torch.dtype | None = None):
        self.round_to = round_to
        self.k: list[torch.Tensor] = [torch.empty(n_kv, capacity, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.v: list[torch.Tensor] = [torch.empty(n_kv, capacity, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    def __len__(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (T, Hkv, D); return all keys and values so far, (Hkv, S, D) views."""
        n, t = self.lengths[layer], k.shape[0]
        if n + t > self.k[layer].shape[1]:
            cap = max(2 * self.k[layer].shape[1], n + t)
            for buf in (self.k, self.v):
                old = buf[layer]
                grown = old.new_empty(old.shape[0], cap, old.shape[2])
                grown[:, :n] = old[:, :n]
                buf[layer] = grown
        if self.round_to is not None:
            k, v = k.to(self.round_to), v.to(self.round_to)
        self.k[layer][:, n:n + t] = k.transpose(0, 1)
        self.v[layer][:, n:n + t] = v.transpose(0, 1)
        self.lengths[layer] = n + t
        return self.k[layer][:, : n + t], self.v[layer][:, : n + t]

    def truncate(self, n: int) -> None:
        self.lengths = [min(x, n) for x in self.lengths]


def cache_for(model) -> SeqKVCache:
    """An empty cache shaped for `model`, in its activation dtype, rounded as its kv_dtype says."""
    c = model.config
    round_to = model.kv_dtype if model.kv_dtype != model.dtype and model.dtype == torch.float32 else None
    return SeqKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, model.dtype, round_to=round_to)
