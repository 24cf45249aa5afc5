"""QWeight: a weight kept as GGUF blocks, and QLinear, the module that multiplies by one.

Models never mention quantization: the loader swaps a QLinear in where a Linear would be, and the
backend decides how to multiply (the torch backend prepares a compute form once, per weight).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .dequant import dequantize


@dataclass(eq=False)
class QWeight:
    raw: torch.Tensor  # uint8 (rows, row_bytes): whole GGUF blocks, row-major
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # logical (out_features, in_features)
    cache: dict[str, Any] = field(default_factory=dict)  # backend-prepared compute forms

    @classmethod
    def from_float(cls, t: torch.Tensor, shape: tuple[int, int]) -> "QWeight":
        """A dense f32 tensor as an F32 'quantized' weight (bytes reinterpreted, not copied)."""
        raw = t.to(torch.float32).contiguous().view(torch.uint8).view(shape[0], -1)
        return cls(raw, GGMLQuantizationType.F32, shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, dtype).view(self.shape)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize only the rows named by ids (embedding lookups)."""
        return dequantize(self.raw[ids.reshape(-1)], self.qtype, dtype).view(*ids.shape, self.shape[1])


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


class QLinear(nn.Module):
    """y = x W^T (+ b) with W a QWeight; the backend does the multiply. The caller (a loader,
    ISQ) chooses the backend: backends import this module, so it imports none of them."""

    def __init__(self, weight: QWeight, bias: torch.Tensor | None, backend):
        super().__init__()
        self.qweight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.backend = backend
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.qmatmul(x, self.qweight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qweight.qtype.name}"


class QWeightGroup(QWeight):
    """Several weights over the same input, stacked by rows (their blocks stay separate)."""

    def __init__(self, parts: list[QWeight]):
        rows = sum(p.shape[0] for p in parts)
        super().__init__(parts[0].raw[:0], parts[0].qtype, (rows, parts[0].shape[1]))
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])


class FusedQLinear(nn.Module):
    """q/k/v or gate/up as one multiply: one pass over the input, one kernel call, then split."""

    def __init__(self, linears: list[QLinear]):
        super().__init__()
        self.qweight = QWeightGroup([lin.qweight for lin in linears])
        self.sizes = [lin.out_features for lin in linears]
        biases = [lin.bias for lin in linears]
        self.bias = None if all(b is None for b in biases) else nn.Parameter(torch.cat(
            [b if b is not None else torch.zeros(n) for b, n in zip(biases, self.sizes)]), requires_grad=False)
        self.backend = linears[0].backend

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """All parts' outputs side by side, (..., sum of out_features)."""
        y = self.backend.qmatmul(x, self.qweight)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.full(x), self.sizes, dim=-1))


class QEmbedding(nn.Module):
    """An embedding table kept as blocks; lookups dequantize only the rows they need."""

    def __init__(self, weight: QWeight):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids)
