"""The K-quant quantizers (Q2_K..Q6_K): llama.cpp's quantize_row_q*_K_ref, vectorized.

ggml searches each sub-block's scale (and min) with small iterative fits, one sub-block at a
time; here every search runs on all sub-blocks of all super-blocks at once, with the loop over
the candidate scales (or the coordinate updates of make_q3_quants) outside. Sums run left to
right in f32 as C's loops do, and constants are rounded as C computes them, so the bytes are
ggml's for over 99% of blocks. Block layouts are those dequant.py reads (field@byte offset).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

GROUP_MAX_EPS = 1e-15


# --- byte helpers (shared with quantize.py) --------------------------------------------------------

def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n, 1) f32 -> (n, 2) uint8 of its fp16 (round to nearest even, as ggml's FP32_TO_FP16)."""
    return v.reshape(-1, 1).half().view(torch.uint8)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """What a stored fp16 field reads back as."""
    return v.half().float()


def pack_bits(q: torch.Tensor, width: int) -> torch.Tensor:
    """(..., count, k) fields of `width` bits -> (..., k) bytes with field i at bit width*i
    (the inverse of dequant._split)."""
    out = q[..., 0, :].to(torch.uint8)
    for i in range(1, q.shape[-2]):
        out = out | (q[..., i, :].to(torch.uint8) << (width * i))
    return out


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim (the first on ties), keepdim."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t rounded once, as C divides (torch's `c / t` is reciprocal(t) * c: two roundings)."""
    return torch.full_like(t, c) / t


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim from left to right in f32, keepdim: C's `s += t[i]` loop, so that
    near-ties in the searches resolve as in ggml (a tree-shaped reduction rounds differently)."""
    cols = t.t().contiguous()  # (k, m): each step adds one contiguous row
    acc = cols[0].clone()
    for row in cols[1:]:
        acc += row
    return acc.unsqueeze(-1)


def _c(expr: float) -> float:
    """A constant as C computes it in float (e.g. rmin + rdelta*is + nmax)."""
    return float(np.float32(expr))


def _where(cond: torch.Tensor, a, b: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, torch.as_tensor(a, dtype=b.dtype), b)


# --- the scale searches ------------------------------------------------------------------------------

def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants on every row: x ~ scale * L - the_min, L in 0..nmax, trying nstep+1
    ranges for the weighted least-squares fit. Returns (scale, the_min, L), each keepdim."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    xm = x - mn
    sum_w, sum_x = seqsum(w), seqsum(w * x)

    def cost(v):
        return seqsum(w * (v.abs() if use_mad else v * v))

    iscale = rdiv(nmax, span)
    scale = 1 / iscale
    L = (iscale * xm).round().clamp(0, nmax)
    best, best_min = cost(scale * L + mn - x), mn
    for step in range(nstep + 1):  # ggml moves `min` to each better fit: later ranges start there
        span = torch.where(flat, torch.ones_like(mx), mx - best_min)
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        la = (rdiv(c, span) * (x - best_min)).round().clamp(0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * la), seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = _where(pos, 0.0, this_min)
        mad = cost(this_scale * la + this_min - x)
        better = (D > 0) & (mad < best)
        L, best = torch.where(better, la, L), torch.where(better, mad, best)
        scale, best_min = torch.where(better, this_scale, scale), torch.where(better, this_min, best_min)
    return _where(flat, 0.0, scale), torch.where(flat, -mn, -best_min), _where(flat, 0.0, L)


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1 (weights x^2) on every row: x ~ scale * (L - nmax),
    L in 0..2*nmax-1, trying 18 scales around -nmax / max. Returns (scale, L), keepdim."""
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = _where(zero, 1.0, mx)
    w = x * x

    def fit(iscale):
        l = (iscale * x).round().clamp(-nmax, nmax - 1)
        return l, seqsum(w * x * l), seqsum(w * l * l)

    l, sumlx, suml2 = fit(rdiv(-nmax, mx))
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(rdiv(-_c(nmax + _c(np.float32(0.1) * step)), mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return _where(zero, 0.0, scale), _where(zero, 0.0, L)


def make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse on every row: start from -nmax / max, then up to 5 passes of
    coordinate updates, each L[i] moved to its best level given the others. (scale, L), keepdim."""
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = _where(zero, 1.0, mx)
    L = (rdiv(-nmax, mx) * x).round().clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = seqsum(wx * L), seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            xi, wi, wxi, li = x[:, i:i + 1], w[:, i:i + 1], wx[:, i:i + 1], L[:, i:i + 1]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = (xi * sl2 / slx).round().clamp(-nmax, nmax - 1)
            slx2, sl22 = slx + wxi * new, sl2 + wi * new * new
            upd = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i:i + 1] = torch.where(upd, new, li)
            sumlx, suml2 = torch.where(upd, slx2, sumlx), torch.where(upd, sl22, suml2)
            changed |= upd
        if not changed.any():
            break
    scale = torch.nan_to_num(sumlx / suml2, nan=0.0, posinf=0.0, neginf=0.0)
    return _where(zero, 0.0, scale), _where(zero, 0.0, L + nmax)


def _requantize(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, lo: int, hi: int,
                fallback: torch.Tensor) -> torch.Tensor:
    """L = round((x + m) / d) clamped, with the searched L kept where d is 0 (as ggml skips)."""
    num = x if m is None else x + m
    return torch.where(d == 0, fallback, (num / _where(d == 0, 1.0, d)).round().clamp(lo, hi))


# --- formats --------------------------------------------------------------------------------------

def q2_k(x):  # scales@0 (lo nibble scale, hi nibble min) qs@16 d@80 dmin@82
    n = x.shape[0]
    xs = x.view(n * 16, 16)
    scales, mins, L = make_qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.view(n, 16), mins.view(n, 16)
    max_scale = scales.amax(-1, keepdim=True).clamp(min=0) + 0.0  # C starts from +0
    max_min = mins.amax(-1, keepdim=True).clamp(min=0) + 0.0  # C starts from +0
    ls = _where(max_scale > 0, (rdiv(15, max_scale) * scales).round().clamp(0, 15), torch.zeros_like(scales))
    lm = _where(max_min > 0, (rdiv(15, max_min) * mins).round().clamp(0, 15), torch.zeros_like(mins))
    d = fp16_round(_where(max_scale > 0, max_scale / 15, torch.zeros_like(max_scale)))
    dmin = fp16_round(_where(max_min > 0, max_min / 15, torch.zeros_like(max_min)))
    dl, ml = (d * ls).view(n, 16, 1), (dmin * lm).view(n, 16, 1)
    L = _requantize(x.view(n, 16, 16), dl, ml, 0, 3, L.view(n, 16, 16))
    qs = pack_bits(L.view(n, 2, 4, 32), 2).view(n, 64)
    sc = (ls.to(torch.uint8) | (lm.to(torch.uint8) << 4))
    return torch.cat([sc, qs, f16_bytes(d), f16_bytes(dmin)], 1)


def q3_k(x):  # hmask@0 qs@32 scales@96 (16 x 6 bits) d@108
    n = x.shape[0]
    scales, L = make_q3(x.reshape(n * 16, 16), 4)
    scales = scales.view(n, 16)
    max_scale = signed_absmax(scales)
    has = max_scale != 0
    iscale = rdiv(-32, _where(~has, 1.0, max_scale))
    l = _where(has, (iscale * scales).round().clamp(-32, 31) + 32, torch.full_like(scales, 32.0)).to(torch.uint8)
    d = fp16_round(_where(has, 1 / iscale, torch.zeros_like(iscale)))
    sc_bytes = torch.cat([(l[:, :8] & 15) | ((l[:, 8:] & 15) << 4), pack_bits((l >> 4).view(n, 4, 4), 2)], 1)
    sc_bytes = _where(has, sc_bytes, torch.zeros_like(sc_bytes))
    dl = (d * (l.float() - 32)).view(n, 16, 1)
    L = _requantize(x.view(n, 16, 16), dl, None, -4, 3, L.view(n, 16, 16) - 4).view(n, 256) + 4
    hmask = pack_bits((L > 3).view(n, 8, 32), 1)
    qs = pack_bits((L - 4 * (L > 3)).view(n, 2, 4, 32), 2).view(n, 64)
    return torch.cat([hmask, qs, sc_bytes, f16_bytes(d)], 1)


def _k4_scales(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The 8 sub-blocks of 32 of Q4_K/Q5_K: (12 packed scale bytes, d, dmin, L (n, 8, 32))."""
    n = x.shape[0]
    xs = x.view(n * 8, 32)
    av = (seqsum(xs * xs) / 32).sqrt()
    scales, mins, L = make_qkx2(xs, av + xs.abs(), nmax, rmin, rdelta, nstep, False)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale = scales.amax(-1, keepdim=True).clamp(min=0) + 0.0  # C starts from +0
    max_min = mins.amax(-1, keepdim=True).clamp(min=0) + 0.0  # C starts from +0
    inv_scale = _where(max_scale > 0, rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = _where(max_min > 0, rdiv(63, max_min), torch.zeros_like(max_min))
    ls = (inv_scale * scales).round().clamp(0, 63).to(torch.uint8)
    lm = (inv_min * mins).round().clamp(0, 63).to(torch.uint8)
    packed = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], 1)
    d, dmin = fp16_round(max_scale / 63), fp16_round(max_min / 63)
    dl, ml = (d * ls.float()).view(n, 8, 1), (dmin * lm.float()).view(n, 8, 1)
    L = _requantize(x.view(n, 8, 32), dl, ml, 0, nmax, L.view(n, 8, 32))
    return packed, d, dmin, L


def q4_k(x):  # d@0 dmin@2 scales@4 qs@16: 4 runs of 32 bytes, sub-block 2r low nibbles, 2r+1 high
    n = x.shape[0]
    packed, d, dmin, L = _k4_scales(x, 15, -1.0, 0.1, 20)
    qs = pack_bits(L.view(n, 4, 2, 32), 4).view(n, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), packed, qs], 1)


def q5_k(x):  # d@0 dmin@2 scales@4 qh@16 (bit s: sub-block s) qs@48
    n = x.shape[0]
    packed, d, dmin, L = _k4_scales(x, 31, -0.5, 0.1, 15)
    L = L.to(torch.uint8)
    qh = pack_bits((L >> 4).view(n, 8, 32), 1)
    qs = pack_bits((L & 15).view(n, 4, 2, 32), 4).view(n, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), packed, qh, qs], 1)


def q6_k(x):  # ql@0 qh@128 scales@192 (int8) d@208
    n = x.shape[0]
    scales, L = make_qx(x.reshape(n * 16, 16), 32)
    scales = scales.view(n, 16)
    max_scale = signed_absmax(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = rdiv(-128, _where(empty, 1.0, max_scale))
    sc = (iscale * scales).round().clamp(max=127)
    d = fp16_round(1 / iscale)
    dl = (d * sc).view(n, 16, 1)
    L = _requantize(x.view(n, 16, 16), dl, None, -32, 31, L.view(n, 16, 16) - 32).view(n, 256) + 32
    L = L.to(torch.uint8)
    ql = pack_bits((L & 15).view(n, 2, 2, 64), 4).view(n, 128)
    qh = pack_bits((L >> 4).view(n, 2, 4, 32), 2).view(n, 64)
    out = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], 1)
    return _where(empty, torch.zeros_like(out), out)


KQUANTS = {Q.Q2_K: q2_k, Q.Q3_K: q3_k, Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k}
