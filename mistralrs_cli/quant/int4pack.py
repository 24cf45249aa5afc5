"""4-bit GGUF types as torch's packed int4 weights (`_weight_int4pack_mm_for_cpu`).

Q4_0, Q4_1 and Q4_K all store, per group of 32 weights, w = s * q + b with q in 0..15. torch's
CPU int4 GEMM computes w = (q - 8) * scale + zero per group of 32 with bf16 scale and zero, so
scale = s and zero = b + 8 s; the bf16 rounding of those two is the only change to the weights.
The weights stay 4-bit in memory (half of the 8.5 bits of f16 + scales it would otherwise take).
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

from .dequant import _f16, _k4_scales, _q4, _split

GROUP = 32


def _q4_0(b: torch.Tensor):  # d@0 qs@2: w = d * (q - 8)
    d = _f16(b, 0)
    return _q4(b[:, 2:]), d, -8.0 * d


def _q4_1(b: torch.Tensor):  # d@0 m@2 qs@4: w = d * q + m
    return _q4(b[:, 4:]), _f16(b, 0), _f16(b, 2)


def _q4_k(b: torch.Tensor):  # 8 groups of 32: w = (d * sc) * q - (dmin * m)
    n = b.shape[0]
    sc, mn = _k4_scales(b, 4)
    q = _split(b[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n * 8, 32)
    return q, (_f16(b, 0) * sc.float()).reshape(-1, 1), -(_f16(b, 2) * mn.float()).reshape(-1, 1)


AFFINE_4BIT = {Q.Q4_0: (_q4_0, 18), Q.Q4_1: (_q4_1, 20), Q.Q4_K: (_q4_k, 144)}


def supported(qtype: Q, shape: tuple[int, int]) -> bool:
    n, k = shape
    return qtype in AFFINE_4BIT and k % GROUP == 0 and n % 8 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack(parts: list[tuple[torch.Tensor, Q]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(raw blocks (N_i, row_bytes), qtype)] stacked by rows -> (packed int4 weight,
    scales_and_zeros (K/32, N, 2) bf16)."""
    qs, ss, bs = [], [], []
    for raw, qtype in parts:
        fn, size = AFFINE_4BIT[qtype]
        q, s, b = fn(raw.reshape(-1, size))  # q: (N_i*K/32, 32); s, b: (N_i*K/32, 1)
        qs.append(q), ss.append(s), bs.append(b)
    q, s, b = torch.cat(qs), torch.cat(ss), torch.cat(bs)
    n = q.numel() // k
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)
    zero = b + 8.0 * s
    sz = torch.stack([s.view(n, k // GROUP), zero.view(n, k // GROUP)], dim=-1)  # (N, K/32, 2)
    return packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x (M, K) f32 -> (M, N) f32, computed with bf16 activations."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, sz).float()
