"""HQQ (half-quadratic quantization) as two more block formats, HQQ4 and HQQ8.

mistral.rs's ISQ HQQ: groups of 64 weights, w = (q - zero) * scale with q of 4 or 8 bits, the
zero point fitted by HQQ's proximal solver (lp norm 0.7, beta 10 growing by 1.01 a step, 10
steps, zero not rounded). Two choices of ours, so HQQ weights are ordinary blocks that every
path (dequantize, row lookups, fused groups, the torch backend) already handles:
- a group is 64 consecutive weights of a row (mistral.rs groups along axis 0 of the flattened
  tensor, which mixes rows), and
- each group stops at its own best step (mistral.rs stops all groups when the mean error over
  the whole tensor stops falling, and keeps the zero of the step after the best).
Block layout: scale f32@0, zero f32@4, codes@8 (HQQ4: element j in the low nibble of byte j,
j+32 in the high; HQQ8: one byte each). 5 and 9 bits per weight.
"""
from __future__ import annotations

import enum

import torch

from .dequant import _q4, register_format
from .kquants import pack_bits, rdiv
from .quantize import register

GROUP = 64
STEPS, LP_NORM, BETA, KAPPA = 10, 0.7, 10.0, 1.01


class HQQ(enum.IntEnum):
    """Values clear of every GGMLQuantizationType, so GGUF-keyed tables never match them."""
    HQQ4 = 1004
    HQQ8 = 1008

    @property
    def bits(self) -> int:
        return self.value - 1000


def _shrink(e: torch.Tensor, beta: float) -> torch.Tensor:
    """The lp (p < 1) proximal operator: sign(e) * relu(|e| - |e|^(p-1) / beta)."""
    a = e.abs()
    return torch.sign(e) * torch.relu(a - a.pow(LP_NORM - 1) / beta)


def fit(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 64) groups -> (codes, scale, zero) with x ~ (codes - zero) * scale."""
    top = float(2 ** bits - 1)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    inv = rdiv(top, mx - mn).clamp(0, 2e4)  # an inverse scale; flat groups get the cap
    zero = -mn * inv
    best_err = torch.full_like(mn, float("inf"))
    best_zero, active, beta = zero, torch.ones_like(mn, dtype=torch.bool), BETA
    for _ in range(STEPS):
        q = (x * inv + zero).round().clamp(0, top)
        back = (q - zero) / inv
        err = (x - back).abs().mean(-1, keepdim=True)
        active = active & (err < best_err)
        if not active.any():
            break
        best_err, best_zero = torch.where(active, err, best_err), torch.where(active, zero, best_zero)
        step = (q - (x - _shrink(x - back, beta)) * inv).mean(-1, keepdim=True)
        zero = torch.where(active, step, zero)
        beta *= KAPPA
    codes = (x * inv + best_zero).round().clamp(0, top)
    return codes, 1 / inv, best_zero


def _quantizer(bits: int):
    def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = fit(x, bits)
        codes = codes.to(torch.uint8)
        if bits == 4:
            codes = pack_bits(codes.view(-1, 2, GROUP // 2), 4)
        header = torch.cat([scale, zero], 1).contiguous().view(torch.uint8)
        return torch.cat([header, codes], 1)
    return quantize_blocks


def _dequantizer(bits: int):
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        head = b[:, :8].contiguous().view(torch.float32)  # (n, 2): scale, zero
        q = _q4(b[:, 8:]) if bits == 4 else b[:, 8:]
        return (q.float() - head[:, 1:2]) * head[:, 0:1]
    return dequantize_blocks


for _t in HQQ:
    register_format(_t, GROUP, 8 + GROUP * _t.bits // 8, _dequantizer(_t.bits))
    register(_t)(_quantizer(_t.bits))
