"""Rotary tables for the torch-free native runtime (backends/native_model.py), in numpy.

The rope_scaling kinds a GGUF file carries (none, linear, YaRN, Llama 3's rope_freqs divisors),
computed as models/layers.py's ROPE_INV_FREQ computes them in torch. The torch models keep their
own: numpy's and torch's pow/cos can differ by an ulp, and the torch path's numbers stay as they
are. Each function takes (dim, base, scaling, max_position_embeddings, seq_len) and returns
(dim/2,) float32 inverse frequencies and the cos/sin multiplier (YaRN's attention factor, else 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config import yarn_mscale

F32 = np.float32


def _default(dim: int, base: float, _scaling: dict[str, Any], _max_pos: int, _seq_len: int) -> tuple[np.ndarray, float]:
    idx = np.arange(0, dim, 2, dtype=F32)
    return (F32(1.0) / (F32(base) ** (idx / F32(dim)))).astype(F32), 1.0


def _linear(dim, base, scaling, max_pos, seq_len):
    inv, _ = _default(dim, base, scaling, max_pos, seq_len)
    return (inv / F32(scaling["factor"])).astype(F32), 1.0


def _yarn(dim, base, scaling, max_pos, seq_len):
    """YaRN: interpolate low frequencies, extrapolate high ones (a linear ramp over dimensions
    between the beta_fast and beta_slow rotation counts); cos/sin scaled by the attention factor."""
    orig = int(scaling.get("original_max_position_embeddings") or max_pos)
    factor = float(scaling.get("factor") or max_pos / orig)
    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def corr_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(scaling.get("beta_fast") or 32), corr_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1).astype(F32)
    pos_freqs = F32(base) ** (np.arange(0, dim, 2, dtype=F32) / F32(dim))
    extrapolate = F32(1) - ramp
    inv = (F32(1.0) / (F32(factor) * pos_freqs)) * (F32(1) - extrapolate) + (F32(1.0) / pos_freqs) * extrapolate
    return inv.astype(F32), float(attn)


def _freq_factors(dim, base, scaling, max_pos, seq_len):
    """llama.cpp's rope_freqs tensor (how GGUF files carry Llama 3's scaling): divisors per frequency."""
    inv, _ = _default(dim, base, scaling, max_pos, seq_len)
    return (inv / np.asarray(scaling["factors"], dtype=F32)).astype(F32), 1.0


# rope_scaling["rope_type"] -> the function; more types plug in here
ROPE_INV_FREQ: dict[str, Callable[..., tuple[np.ndarray, float]]] = {
    "default": _default, "linear": _linear, "yarn": _yarn, "freq_factors": _freq_factors}


@dataclass
class RopeTable:
    """The native runtime's rotary: cos, sin (T, dim) for a forward's positions."""

    dim: int
    inv_freq: np.ndarray
    factor: float

    def tables(self, positions: np.ndarray, memo: dict) -> tuple[np.ndarray, np.ndarray]:
        """Once per forward per frequency vector (memo is the forward's)."""
        key = ("rope", id(self))
        if key not in memo:
            freqs = positions.astype(F32)[:, None] * self.inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=1)
            cos, sin = np.cos(emb), np.sin(emb)
            if self.factor != 1.0:
                cos, sin = cos * F32(self.factor), sin * F32(self.factor)
            memo[key] = (np.ascontiguousarray(cos, dtype=F32), np.ascontiguousarray(sin, dtype=F32))
        return memo[key]
