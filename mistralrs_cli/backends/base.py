"""The Backend protocol: the two operations models need from a kernel library."""
from __future__ import annotations

from typing import Protocol

import torch

from ..quant.qweight import QWeight


class Backend(Protocol):
    name: str

    def qmatmul(self, x: torch.Tensor, w: QWeight) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., out), in x's dtype."""

    def dequantize(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        """The full weight as a dense (out, in) tensor."""
