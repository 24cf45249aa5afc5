"""Per-sequence KV cache: contiguous per-layer buffers that grow by doubling."""
from __future__ import annotations

import torch


class SeqKVCache:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 capacity: int = 256):
        self.k: list[torch.Tensor] = [torch.empty(capacity, n_kv, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.v: list[torch.Tensor] = [torch.empty(capacity, n_kv, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    def __len__(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t = self.lengths[layer], k.shape[0]
        if n + t > self.k[layer].shape[0]:
            cap = max(2 * self.k[layer].shape[0], n + t)
            for buf in (self.k, self.v):
                grown = buf[layer].new_empty(cap, *buf[layer].shape[1:])
                grown[:n] = buf[layer][:n]
                buf[layer] = grown
        self.k[layer][n:n + t] = k
        self.v[layer][n:n + t] = v
        self.lengths[layer] = n + t
        return self.k[layer][: n + t], self.v[layer][: n + t]

    def truncate(self, n: int) -> None:
        self.lengths = [min(x, n) for x in self.lengths]
