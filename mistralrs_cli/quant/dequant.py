"""Exact dequantization of GGUF block formats in torch: the reference path of the project.

`dequantize(raw, qtype)` takes uint8 rows of whole blocks, (..., row_bytes), and returns
(..., row_elements) floats, bit-identical to ggml's reference (and to gguf.quants.dequantize):
fp16 scales go to f32 first and every product is an f32 product in ggml's order. No loop runs
over blocks, so the same code runs on any device and on a few rows for embedding lookups.

Each format is one function from (n_blocks, type_size) uint8 to (n_blocks, block_size) f32,
registered in `_BLOCK_DEQUANT`. Block layouts follow ggml-common.h (field@byte offset in the
comments). The IQ grids are format data shipped by gguf-py; we decode its packed tables.
"""
from __future__ import annotations

import enum
import functools
from typing import Callable

import gguf
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from mistralrs_cli.errors import UserError

__all__ = ["SUPPORTED", "block_size", "dequantize", "row_bytes"]

# gguf-py still lists Q8_1 as 40 bytes (f32 d and s); ggml's block_q8_1 is {half d, half s,
# int8 qs[32]} = 36 bytes (static_assert in ggml-common.h), and ggml writes what ggml defines.
_SIZES: dict[Q, tuple[int, int]] = {**GGML_QUANT_SIZES, Q.Q8_1: (32, 36)}

_BlockFn = Callable[[torch.Tensor], torch.Tensor]
_BLOCK_DEQUANT: dict[Q, _BlockFn] = {}
# Plain float types: a reinterpretation of the bytes, no blocks.
_FLOAT_VIEWS: dict[Q, torch.dtype] = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _register(qtype: Q) -> Callable[[_BlockFn], _BlockFn]:
    def deco(fn: _BlockFn) -> _BlockFn:
        _BLOCK_DEQUANT[qtype] = fn
        return fn
    return deco


def register_format(qtype, block: int, nbytes: int, fn: _BlockFn) -> None:
    """A block format beyond GGUF's (HQQ, made by --isq): `qtype` is a member of another enum
    whose values no GGMLQuantizationType uses, so tables keyed by GGUF types never match it."""
    _SIZES[qtype] = (block, nbytes)
    _BLOCK_DEQUANT[qtype] = fn


def _qtype(qtype):
    """A GGUF type (or its number), or a registered format's own enum member, as is."""
    return qtype if isinstance(qtype, enum.Enum) and qtype in _BLOCK_DEQUANT else Q(qtype)


def block_size(qtype: Q) -> int:
    """Elements per block (1 for plain float types)."""
    return _SIZES[_qtype(qtype)][0]


def row_bytes(qtype: Q, n_elements: int) -> int:
    """Bytes taken by a row of `n_elements` values of `qtype`."""
    qtype = _qtype(qtype)
    elems, nbytes = _SIZES[qtype]
    if n_elements % elems:
        raise UserError(f"a row of {n_elements} values is not a whole number of {qtype.name} blocks "
                        f"({elems} values each); the GGUF file is malformed")
    return n_elements // elems * nbytes


def dequantize(raw: torch.Tensor, qtype: Q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., row_bytes) uint8 of whole blocks -> (..., row_elements) of `dtype`.

    Plain float types may come back as a view of `raw` when no conversion is needed."""
    qtype = _qtype(qtype)
    if qtype not in _BLOCK_DEQUANT and qtype not in _FLOAT_VIEWS:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise UserError(f"tensor type {qtype.name} is not supported yet; supported: {names}")
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 bytes, got {raw.dtype}")
    elems, nbytes = _SIZES[qtype]
    lead, width = tuple(raw.shape[:-1]), raw.shape[-1]
    if width % nbytes:
        raise ValueError(f"{width} bytes per row is not a whole number of {qtype.name} blocks "
                         f"({nbytes} bytes)")
    out_shape = (*lead, width // nbytes * elems)
    if qtype in _FLOAT_VIEWS:
        return _aligned(raw.contiguous(), nbytes).view(_FLOAT_VIEWS[qtype]).reshape(out_shape).to(dtype)
    blocks = raw.reshape(-1, nbytes)
    return _BLOCK_DEQUANT[qtype](blocks).reshape(out_shape).to(dtype)


# --- helpers -------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor, itemsize: int) -> torch.Tensor:
    """dtype views need an aligned storage offset; copy the rare tensor that lacks one."""
    return t.clone() if t.storage_offset() % itemsize else t


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """fp16 field at byte `off` of every block -> (n_blocks, 1) f32."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _le(b: torch.Tensor, nbytes: int) -> torch.Tensor:
    """(..., k*nbytes) little-endian unsigned fields -> (..., k) int64."""
    b = b.reshape(*b.shape[:-1], -1, nbytes).long()
    out = b[..., 0].clone()
    for i in range(1, nbytes):
        out |= b[..., i] << (8 * i)
    return out


@functools.lru_cache(maxsize=None)
def _shifts(width: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.arange(count, dtype=torch.int64) * width).to(dtype).to(device)


def _split(x: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Unpack `count` bit fields of `width` bits, low bits first: (..., k) -> (..., count, k).

    One scalar shift and mask per field: torch vectorizes those, not broadcast shifts."""
    mask, planes = (1 << width) - 1, []
    for i in range(count):
        p = x >> (width * i) if i else x
        planes.append(p if x.dtype == torch.uint8 and width * (i + 1) == 8 else p & mask)
    return torch.stack(planes, dim=-2)


def _fields(x: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Like _split but the fields go last: (..., k) -> (..., k, count)."""
    return (x.unsqueeze(-1) >> _shifts(width, count, x.dtype, x.device)) & ((1 << width) - 1)


def _nibbles_last(x: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k): low then high nibble of each byte, byte by byte."""
    return torch.stack((x & 15, x >> 4), dim=-1).flatten(-2)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for integer idx of any shape: (*idx.shape, *table.shape[1:])."""
    flat = table.index_select(0, idx.reshape(-1).to(torch.int32))
    return flat.view(*idx.shape, *table.shape[1:])


_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@functools.lru_cache(maxsize=None)
def _table(name: str, device: torch.device) -> torch.Tensor:
    """Lookup tables, built once per device."""
    if name == "iq4":
        return torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=device)
    bits = (torch.arange(256).view(256, 1) >> torch.arange(8)) & 1
    if name == "bit4":  # byte -> its 8 bits, each moved to bit 4
        return (bits << 4).to(torch.uint8).to(device)
    if name == "sign8":  # byte -> 8 factors, -1 where the bit is set
        return (1 - 2 * bits).float().to(device)
    if name == "ksigns":  # 7 stored sign bits + an 8th that makes the count of negatives even
        parity = bits[:128, :7].sum(1, keepdim=True) % 2
        return (1 - 2 * torch.cat((bits[:128, :7], parity), 1)).float().to(device)
    return _grid(name).to(device)


def _grid(name: str) -> torch.Tensor:
    """Decode a gguf-py packed IQ grid: hex bytes of k-bit indices into `grid_map`, low bits first."""
    cls = getattr(gguf.quants, name)
    values = torch.tensor(cls.grid_map, dtype=torch.float32)
    width = max(1, (len(cls.grid_map) - 1).bit_length())
    per_byte = 8 // width
    data = torch.frombuffer(bytearray(bytes.fromhex(cls.grid_hex.decode())), dtype=torch.uint8)
    idx = _split(data.view(-1, 1), 8 // per_byte, per_byte) & ((1 << width) - 1)
    return values[idx.reshape(-1).long()].view(*cls.grid_shape)


# --- simple 32-element formats --------------------------------------------------------------------

def _q4(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 nibbles: element j is the low nibble of byte j, j+16 the high."""
    return _split(qs, 4, 2).flatten(-2)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5 block: bit j of the little-endian u32 qh is bit 4 of element j (a byte -> 8 lookup)."""
    return _q4(qs) | _lookup(_table("bit4", qs.device), qh).flatten(-2)


@_register(Q.Q4_0)
def _q4_0(b):  # d@0 qs@2
    return _q4(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))


@_register(Q.Q4_1)
def _q4_1(b):  # d@0 m@2 qs@4
    return _q4(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


@_register(Q.Q5_0)
def _q5_0(b):  # d@0 qh@2 qs@6
    return _q5(b[:, 2:6], b[:, 6:]).float().sub_(16).mul_(_f16(b, 0))


@_register(Q.Q5_1)
def _q5_1(b):  # d@0 m@2 qh@4 qs@8
    return _q5(b[:, 4:8], b[:, 8:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


@_register(Q.Q8_0)
def _q8_0(b):  # d@0 qs@2 (int8)
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


@_register(Q.Q8_1)
def _q8_1(b):  # d@0 s@2 qs@4 (int8); s = d * sum(qs) is only for dot products
    return b[:, 4:].view(torch.int8).float().mul_(_f16(b, 0))


# --- K-quants: 256-element super-blocks -----------------------------------------------------------

@_register(Q.Q2_K)
def _q2_k(b):  # scales@0 (16: lo nibble scale, hi nibble min) qs@16 d@80 dmin@82
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 15).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    # 2 halves of 128: 32 bytes each, 4 two-bit planes -> 8 runs of 32 -> 16 sub-blocks of 16
    q = _split(b[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).view(n, 256)


@_register(Q.Q3_K)
def _q3_k(b):  # hmask@0 qs@32 scales@96 (12, 6-bit packed) d@108
    n = b.shape[0]
    s = b[:, 96:108]
    lo = _split(s[:, :8], 4, 2).reshape(n, 16)     # scale i: nibble i//8 of byte i%8
    hi = _split(s[:, 8:], 2, 4).reshape(n, 16)     # bits 2*(i//4) of byte 8 + i%4
    dl = (_f16(b, 108) * ((lo | (hi << 4)).float() - 32)).view(n, 16, 1)
    low = _split(b[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    high = _split(b[:, :32], 1, 8)                 # run r (0..7) uses bit r of hmask
    # q = low - 4 when the hmask bit is clear, else low: i.e. (low | high << 2) - 4
    q = (low | (high << 2)).view(n, 16, 16).float().sub_(4)
    return q.mul_(dl).view(n, 256)


def _k4_scales(b: torch.Tensor, off: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte 6-bit scales/mins of Q4_K and Q5_K -> (n, 8) scales and (n, 8) mins."""
    s0, s1, s2 = b[:, off:off + 4], b[:, off + 4:off + 8], b[:, off + 8:off + 12]
    sc = torch.cat((s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)), dim=1)
    mn = torch.cat((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), dim=1)
    return sc, mn


def _k4_apply(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """y = (d * scale) * q - (dmin * min) for the 8 sub-blocks of 32 of Q4_K / Q5_K."""
    n = b.shape[0]
    sc, mn = _k4_scales(b, 4)
    dl = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    ml = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    return q.float().mul_(dl).sub_(ml).view(n, 256)


@_register(Q.Q4_K)
def _q4_k(b):  # d@0 dmin@2 scales@4 qs@16: 4 runs of 32 bytes, low nibbles then high
    n = b.shape[0]
    return _k4_apply(b, _split(b[:, 16:].reshape(n, 4, 32), 4, 2).view(n, 8, 32))


@_register(Q.Q5_K)
def _q5_k(b):  # d@0 dmin@2 scales@4 qh@16 qs@48; sub-block s takes bit s of qh
    n = b.shape[0]
    low = _split(b[:, 48:].reshape(n, 4, 32), 4, 2).view(n, 8, 32)
    return _k4_apply(b, low | (_split(b[:, 16:48], 1, 8) << 4))


@_register(Q.Q6_K)
def _q6_k(b):  # ql@0 qh@128 scales@192 (int8) d@208
    n = b.shape[0]
    # per half of 128: ql 64 bytes (low nibbles: runs 0,1; high: runs 2,3), qh 32 bytes x 4 planes
    low = _split(b[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 2, 4, 32)
    high = _split(b[:, 128:192].reshape(n, 2, 32), 2, 4)
    q = (low | (high << 4)).view(n, 16, 16).float().sub_(32)
    dl = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return q.mul_(dl).view(n, 256)


@_register(Q.Q8_K)
def _q8_k(b):  # d@0 (f32) qs@4 (int8) bsums@260 (int16, for dot products)
    d = b[:, 0:4].contiguous().view(torch.float32)
    return b[:, 4:260].view(torch.int8).float().mul_(d)


# --- IQ formats: non-linear grids -------------------------------------------------------------------

@_register(Q.IQ4_NL)
def _iq4_nl(b):  # d@0 qs@2
    return _lookup(_table("iq4", b.device), _q4(b[:, 2:])).mul_(_f16(b, 0))


@_register(Q.IQ4_XS)
def _iq4_xs(b):  # d@0 scales_h@2 (u16) scales_l@4 qs@8
    n = b.shape[0]
    lo = _nibbles_last(b[:, 4:8])                               # sub-block i: nibble i%2 of byte i//2
    hi = _fields(b[:, 2:4], 2, 4).reshape(n, 8)                  # bits 2i of the u16
    dl = (_f16(b, 0) * ((lo | (hi << 4)).float() - 32)).view(n, 8, 1)
    q = _split(b[:, 8:].reshape(n, 8, 16), 4, 2).view(n, 8, 32)
    return _lookup(_table("iq4", b.device), q).mul_(dl).view(n, 256)


def _half_scales(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """IQ2 scales: d * (0.5 + nibble) * 0.25 for each nibble, low first."""
    return d * (_nibbles_last(s).float() + 0.5) * 0.25


@_register(Q.IQ2_XXS)
def _iq2_xxs(b):  # d@0, then 8 x (4 grid bytes, u32 of 4 x 7 sign bits + a 4-bit scale)
    n, dev = b.shape[0], b.device
    g = b[:, 2:].reshape(n, 8, 8)
    aux = _le(g[..., 4:], 4).view(n, 8)
    db = (_f16(b, 0) * ((aux >> 28).float() + 0.5) * 0.25).view(n, 8, 1, 1)
    grid = _lookup(_table("IQ2_XXS", dev), g[..., :4])                     # (n, 8, 4, 8)
    signs = _lookup(_table("ksigns", dev), _fields(aux, 7, 4))
    return (db * grid).mul_(signs).view(n, 256)


@_register(Q.IQ2_XS)
def _iq2_xs(b):  # d@0 qs@2 (32 x u16: 9-bit grid index, 7 sign bits) scales@66
    n, dev = b.shape[0], b.device
    qs = _le(b[:, 2:66], 2).view(n, 8, 2, 2)
    db = _half_scales(_f16(b, 0), b[:, 66:74]).view(n, 8, 2, 1, 1)
    grid = _lookup(_table("IQ2_XS", dev), qs & 511)                        # (n, 8, 2, 2, 8)
    signs = _lookup(_table("ksigns", dev), qs >> 9)
    return (db * grid).mul_(signs).view(n, 256)


@_register(Q.IQ2_S)
def _iq2_s(b):  # d@0 qs@2 signs@34 qh@66 scales@74; index = qs | 2 bits of qh << 8
    n, dev = b.shape[0], b.device
    hi = _fields(b[:, 66:74], 2, 4).int()                                  # (n, 8, 4)
    idx = b[:, 2:34].reshape(n, 8, 4).int() | (hi << 8)
    db = _half_scales(_f16(b, 0), b[:, 74:82]).view(n, 8, 2, 1, 1)
    grid = _lookup(_table("IQ2_S", dev), idx).view(n, 8, 2, 2, 8)
    signs = _lookup(_table("sign8", dev), b[:, 34:66]).view(n, 8, 2, 2, 8)
    return (db * grid).mul_(signs).view(n, 256)


@_register(Q.IQ3_XXS)
def _iq3_xxs(b):  # d@0 qs@2 (64 grid bytes) then 8 x u32 (4 x 7 sign bits + a 4-bit scale)
    n, dev = b.shape[0], b.device
    aux = _le(b[:, 66:98], 4)                                              # (n, 8)
    db = (_f16(b, 0) * ((aux >> 28).float() + 0.5) * 0.5).view(n, 8, 1, 1)
    grid = _lookup(_table("IQ3_XXS", dev), b[:, 2:66]).view(n, 8, 4, 8)
    signs = _lookup(_table("ksigns", dev), _fields(aux, 7, 4))
    return (db * grid).mul_(signs).view(n, 256)


@_register(Q.IQ3_S)
def _iq3_s(b):  # d@0 qs@2 qh@66 signs@74 scales@106; sub-block i: qs[8i+k] | bit k of qh[i] << 8
    n, dev = b.shape[0], b.device
    idx = b[:, 2:66].reshape(n, 8, 8).int() | (_fields(b[:, 66:74], 1, 8).int() << 8)
    db = (_f16(b, 0) * (1 + 2 * _nibbles_last(b[:, 106:110])).float()).view(n, 8, 1, 1)
    grid = _lookup(_table("IQ3_S", dev), idx).view(n, 8, 4, 8)
    signs = _lookup(_table("sign8", dev), b[:, 74:106]).view(n, 8, 4, 8)
    return (db * grid).mul_(signs).view(n, 256)


@_register(Q.IQ1_S)
def _iq1_s(b):  # d@0 qs@2 qh@34 (8 x u16: 4 x 3 index bits, 3-bit scale, delta sign)
    n, dev = b.shape[0], b.device
    qh = _le(b[:, 34:50], 2)                                               # (n, 8)
    dl = (_f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
    delta = torch.where(qh >= 0x8000, -0.125, 0.125).float().view(n, 8, 1, 1)
    idx = b[:, 2:34].reshape(n, 8, 4).long() | (_fields(qh, 3, 4) << 8)
    grid = _lookup(_table("IQ1_S", dev), idx)                              # (n, 8, 4, 8)
    return grid.add_(delta).mul_(dl).view(n, 256)


@_register(Q.IQ1_M)
def _iq1_m(b):  # qs@0 qh@32 scales@48 (4 x u16: 3-bit scales; top nibbles hold fp16 d)
    n, dev = b.shape[0], b.device
    sc = _le(b[:, 48:56], 2)                                               # (n, 4)
    d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d_bytes = torch.stack((d_bits & 255, d_bits >> 8), dim=-1).to(torch.uint8)
    d = d_bytes.view(torch.float16).float().view(n, 1)
    dl = (d * (2 * _fields(sc, 3, 4) + 1).float().view(n, 16)).view(n, 8, 2, 1, 1)
    nib = _nibbles_last(b[:, 32:48]).view(n, 8, 4)                          # 3 index bits + delta sign
    idx = b[:, :32].reshape(n, 8, 4).int() | ((nib & 7).int() << 8)
    delta = torch.where((nib & 8) != 0, -0.125, 0.125).float().view(n, 8, 2, 2, 1)
    grid = _lookup(_table("IQ1_S", dev), idx).view(n, 8, 2, 2, 8)
    return grid.add_(delta).mul_(dl).view(n, 256)


SUPPORTED: frozenset[Q] = frozenset(_FLOAT_VIEWS) | frozenset(_BLOCK_DEQUANT)
