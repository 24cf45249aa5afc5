"""Float weights -> GGUF block bytes, in torch: the quantizers behind --isq.

`quantize(w, qtype)` takes (..., n) floats and returns (..., row_bytes) uint8 of whole blocks laid
out as ggml-common.h defines them, so `dequant.dequantize`, gguf-py and llama.cpp all read them.
F16, BF16 and Q4_0..Q8_0 reproduce gguf-py's quantizers (ports of ggml's reference) bit for bit.
Q8_1, Q8_K and the K-quants follow llama.cpp's quantize_row_*_ref: the same searches for scales
and mins, run for every sub-block at once instead of one after another, summing in C's order;
they give ggml's bytes for over 99% of blocks (a last-bit difference flips a rare exact tie).
Q8_0 and Q4_K..Q6_K run in C instead where the native kernels build (backends/csrc/quantize.c:
ggml's bytes for every block, 15-25x less CPU time than these torch searches).

Each format is one function from (n_blocks, block_size) f32 to (n_blocks, type_size) uint8,
registered in `QUANTIZERS` (other formats, such as HQQ, register themselves the same way).
"""
from __future__ import annotations

from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q

from .dequant import _qtype, block_size, row_bytes
from .kquants import KQUANTS, f16_bytes as _f16_bytes, pack_bits, rdiv, signed_absmax as _signed_absmax

__all__ = ["QUANTIZERS", "quantize"]

_QuantFn = Callable[[torch.Tensor], torch.Tensor]
QUANTIZERS: dict = dict(KQUANTS)


def register(qtype) -> Callable[[_QuantFn], _QuantFn]:
    def deco(fn: _QuantFn) -> _QuantFn:
        QUANTIZERS[qtype] = fn
        return fn
    return deco


def quantize(w: torch.Tensor, qtype, chunk: int = 1 << 17, native: bool = True) -> torch.Tensor:
    """(..., n) floats -> (..., row_bytes) uint8 of `qtype` blocks; n must be a whole number of
    blocks. Q8_0 and Q4_K..Q6_K run in C (backends/csrc/quantize.c, the same bytes, rows over
    torch's thread count) when the native kernels are built and `native` is on. Otherwise about
    `chunk` values are quantized at a time: the searches' temporaries then stay in cache (2-4x
    faster than whole matrices) and the working memory stays small."""
    qtype = _qtype(qtype)
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantizer for {qtype.name}; known: {', '.join(t.name for t in QUANTIZERS)}")
    lead, n = tuple(w.shape[:-1]), w.shape[-1]
    width, block = row_bytes(qtype, n), block_size(qtype)
    if native and qtype in NATIVE_TYPES and n % block == 0 and (out := _native(w, qtype, width)) is not None:
        return out.view(*lead, width)
    blocks = w.detach().reshape(-1, block)
    out = torch.empty(blocks.shape[0], width * block // n if n else 0, dtype=torch.uint8)
    step = max(1, chunk // block)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = QUANTIZERS[qtype](blocks[i:i + step].float())
    return out.view(*lead, width)


NATIVE_TYPES = frozenset({Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def _native(w: torch.Tensor, qtype, width: int, chunk: int = 1 << 20) -> torch.Tensor | None:
    """csrc/quantize.c on rows of about `chunk` values at a time (f32 copies of a 16-bit
    checkpoint stay small); None without the native library."""
    from ..backends.native import library

    lib = library()
    if lib is None or not hasattr(lib, "quantize_rows"):
        return None
    n = w.shape[-1]
    rows = w.detach().reshape(-1, n)
    out = torch.empty(rows.shape[0], width, dtype=torch.uint8)
    step, threads = max(1, chunk // max(n, 1)), torch.get_num_threads()
    for i in range(0, rows.shape[0], step):
        x = rows[i:i + step].to(torch.float32).contiguous()
        if lib.quantize_rows(int(qtype), x.data_ptr(), x.shape[0], n, out[i:i + step].data_ptr(), threads) != 0:
            return None
    return out


# --- helpers -------------------------------------------------------------------------------------

def _f32_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1).float().contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 2k) values < 16 -> (n, k) bytes: element j in the low nibble of byte j, j+k the high."""
    k = q.shape[-1] // 2
    return pack_bits(q.reshape(*q.shape[:-1], 2, k), 4)


def _bits_le(bits: torch.Tensor) -> torch.Tensor:
    """(n, 8k) 0/1 -> (n, k) bytes, bit j of the little-endian bit string = element j."""
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (bits.reshape(bits.shape[0], -1, 8).int() * weights).sum(-1).to(torch.uint8)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as gguf-py's np_roundf computes it."""
    a = v.abs()
    f = a.floor()
    return torch.sign(v) * (f + (2 * (a - f)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


# --- plain float types ----------------------------------------------------------------------------

@register(Q.F32)
def _f32(x):
    return x.contiguous().view(torch.uint8)


@register(Q.F16)
def _f16(x):
    return x.half().view(torch.uint8)


@register(Q.BF16)
def _bf16(x):  # ggml_compute_fp32_to_bf16: NaNs made quiet, then round to nearest even
    n = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int32).to(torch.int16).view(torch.uint8)  # low 16 bits


# --- simple 32-element formats --------------------------------------------------------------------

def _trunc_codes(v: torch.Tensor, top: int) -> torch.Tensor:
    return v.trunc().clamp(0, top).to(torch.uint8)


@register(Q.Q4_0)
def _q4_0(x):  # d = max / -8, q = trunc(x / d + 8.5)
    d = _signed_absmax(x) / -8
    q = _trunc_codes(x * _inverse(d) + 8.5, 15)
    return torch.cat([_f16_bytes(d), _nibbles(q)], 1)


@register(Q.Q4_1)
def _q4_1(x):  # d = (max - min) / 15, m = min, q = trunc((x - min) / d + 0.5)
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    d = (mx - mn) / 15
    q = _trunc_codes((x - mn) * _inverse(d) + 0.5, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _nibbles(q)], 1)


def _q5_high(q: torch.Tensor) -> torch.Tensor:
    return _bits_le((q >> 4) & 1)


@register(Q.Q5_0)
def _q5_0(x):
    d = _signed_absmax(x) / -16
    q = _trunc_codes(x * _inverse(d) + 16.5, 31)
    return torch.cat([_f16_bytes(d), _q5_high(q), _nibbles(q & 15)], 1)


@register(Q.Q5_1)
def _q5_1(x):
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    d = (mx - mn) / 31
    q = _trunc_codes((x - mn) * _inverse(d) + 0.5, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _q5_high(q), _nibbles(q & 15)], 1)


def _q8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.abs().amax(-1, keepdim=True) / 127
    return d, _roundf(x * _inverse(d))


@register(Q.Q8_0)
def _q8_0(x):
    d, q = _q8_codes(x)
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], 1)


@register(Q.Q8_1)
def _q8_1(x):  # ggml's 36-byte block: d, s = d * sum(q) (both fp16), then the int8 codes
    d, q = _q8_codes(x)
    s = q.sum(-1, keepdim=True) * d
    return torch.cat([_f16_bytes(d), _f16_bytes(s), q.to(torch.int8).view(torch.uint8)], 1)


@register(Q.Q8_K)
def _q8_k(x):  # d = max / -127 (f32), q = min(127, round(x / d)), bsums of 16 (int16)
    mx = _signed_absmax(x)
    iscale = torch.where(mx == 0, torch.zeros_like(mx), rdiv(-127, mx))
    q = (iscale * x).round().clamp(max=127)
    bsums = q.view(-1, 16, 16).sum(-1).to(torch.int16).view(torch.uint8)
    d = torch.where(mx == 0, torch.zeros_like(mx), 1 / iscale)
    return torch.cat([_f32_bytes(d), q.to(torch.int8).view(torch.uint8), bsums], 1)

