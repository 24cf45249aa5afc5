"""The torch backend: the reference and the CPU path.

A quantized weight is prepared once into a dense compute form (cached on the QWeight), because
dequantizing every block on every token costs more than the multiply itself on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.qweight import QWeight


class TorchBackend:
    name = "torch"

    def dequantize(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        return w.dequantize(dtype)

    def prepare(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        dense = w.cache.get(dtype)
        if dense is None:
            dense = w.cache[dtype] = w.dequantize(dtype)
        return dense

    def qmatmul(self, x: torch.Tensor, w: QWeight) -> torch.Tensor:
        return F.linear(x, self.prepare(w, x.dtype))
