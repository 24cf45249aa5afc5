"""Blocks shared by every architecture: norms, rotary embeddings, attention, MLPs.

A forward pass works on a flattened batch: all tokens of all sequences in one (T, hidden)
tensor, with explicit positions. Linear layers run once over the whole batch; attention runs per
sequence against that sequence's KV cache (`Batch.seqs`), so sequences of any lengths mix freely.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .batch import Batch, SeqSlice  # noqa: F401 (re-exported)
from .config import ModelConfig, yarn_mscale  # noqa: F401 (re-exported)


class KVCache(Protocol):
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (T, Hkv, D) for `layer`; return all keys and values so far (Hkv, S, D)."""


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * w; Gemma's variant scales by (1 + w) (`offset=1.0`)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.offset = eps, offset
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, offset + weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (the hot path: 2-4 norms per layer)
            if self._scale is None or self._scale[0] is not self.weight:
                self._scale = (self.weight, self.weight.float() + self.offset)
            return F.rms_norm(x, (x.shape[-1],), self._scale[1], self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * w + b: starcoder2."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _default_inv_freq(dim: int, base: float, _scaling: dict[str, Any], _max_pos: int,
                      _seq_len: int) -> tuple[torch.Tensor, float]:
    idx = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    return 1.0 / (base ** (idx / dim)), 1.0


def _linear_inv_freq(dim, base, scaling, max_pos, seq_len):
    inv, _ = _default_inv_freq(dim, base, scaling, max_pos, seq_len)
    return inv / float(scaling["factor"]), 1.0


def _llama3_inv_freq(dim, base, scaling, max_pos, seq_len):
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv, _ = _default_inv_freq(dim, base, scaling, max_pos, seq_len)
    factor = float(scaling["factor"])
    lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled), 1.0


def _yarn_inv_freq(dim, base, scaling, max_pos, seq_len):
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
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attn)


def _freq_factors_inv_freq(dim, base, scaling, max_pos, seq_len):
    """llama.cpp's rope_freqs tensor (how GGUF files carry Llama 3's scaling): divisors per frequency."""
    inv, _ = _default_inv_freq(dim, base, scaling, max_pos, seq_len)
    return inv / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu"), 1.0


def _dynamic_inv_freq(dim, base, scaling, max_pos, seq_len):
    """Dynamic NTK: past max_position_embeddings the base grows with the sequence length (that of
    the forward's furthest position: transformers' behaviour for a growing sequence)."""
    factor, n = float(scaling["factor"]), max(seq_len, max_pos)
    base = base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(dim, base, scaling, max_pos, seq_len)


# rope_scaling["rope_type"] -> (dim, base, scaling, max_position_embeddings, seq_len) ->
# (inverse frequencies (dim/2,), cos/sin multiplier); more types plug in here
ROPE_INV_FREQ = {"default": _default_inv_freq, "linear": _linear_inv_freq, "llama3": _llama3_inv_freq,
                 "yarn": _yarn_inv_freq, "dynamic": _dynamic_inv_freq,
                 "freq_factors": _freq_factors_inv_freq}
SEQ_LEN_DEPENDENT = {"dynamic"}  # recomputed per forward from the batch's furthest position


class Rotary(nn.Module):
    """Rotate-half rotary embeddings (HF layout) over the first `dim` channels of each head."""

    def __init__(self, dim: int, base: float, scaling: dict[str, Any] | None = None,
                 max_positions: int = 4096):
        super().__init__()
        scaling = scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_INV_FREQ:
            raise ValueError(f"rope scaling type {kind!r} is not supported")
        self.dim, self._args = dim, (kind, dim, base, scaling, max_positions)
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset()

    def reset(self) -> None:
        """(Re)compute the frequencies on the CPU (models are built on the meta device)."""
        kind, dim, base, scaling, max_pos = self._args
        self.inv_freq, self.attention_factor = ROPE_INV_FREQ[kind](dim, base, scaling, max_pos, max_pos)

    def tables(self, batch: "Batch", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, dim) for the batch's positions, computed once per forward."""
        kind, _, base, scaling, max_pos = self._args
        key = ("rope", kind, self.dim, base, dtype)
        if key not in batch.memo:
            inv_freq = self.inv_freq
            if kind in SEQ_LEN_DEPENDENT:
                seq_len = int(batch.positions.max()) + 1
                inv_freq, _ = ROPE_INV_FREQ[kind](self.dim, base, scaling, max_pos, seq_len)
            freqs = batch.positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
            sin = freqs.sin()[:, None, :]
            signed = torch.cat([-sin, sin], dim=-1)  # rotate_half(x) * sin == roll(x) * signed
            cos, sin, m = emb.cos(), emb.sin(), self.attention_factor
            if m != 1.0:  # yarn's attention factor, applied to the tables as transformers does
                cos, sin, signed = cos * m, sin * m, signed * m
            batch.memo[key] = (cos.to(dtype), sin.to(dtype), signed.to(dtype))
        return batch.memo[key]

    def forward(self, x: torch.Tensor, batch: "Batch") -> torch.Tensor:
        # x: (T, H, D)
        cos, sin, signed = self.tables(batch, x.dtype)
        if self.dim == x.shape[-1]:  # full rotary: three ops
            return torch.addcmul(x * cos, x.roll(self.dim // 2, dims=-1), signed)
        rot, rest = x[..., : self.dim], x[..., self.dim:]
        half = self.dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


CAUSAL = object()  # mask sentinel: plain causal over a whole prompt


def causal_mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """(Tq, S) bool: key j is visible to a query at position p when j <= p (and p - j < window)."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return mask


def image_mask(q_pos: torch.Tensor, n_keys: int, window: int | None, spans: list) -> torch.Tensor:
    """causal_mask, with the keys of each span (start, end) visible to queries in it; a sliding
    window still bounds it (transformers' Gemma 3: window AND (causal OR block))."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    for a, b in spans:
        mask |= ((q_pos >= a) & (q_pos < b))[:, None] & ((k_pos >= a) & (k_pos < b))[None, :]
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool = False, norm_offset: float = 0.0,
                 qkv_bias: bool | None = None, o_bias: bool | None = None):
        super().__init__()
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.layer = h, kvh, d, layer
        bias = cfg.attention_bias if qkv_bias is None else qkv_bias  # qwen2: always, not in its config
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=bias)
        o_bias = cfg.attention_bias if o_bias is None else o_bias  # as transformers' llama/qwen3/gemma
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=o_bias)
        self.qkv_proj: nn.Module | None = None
        if qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, norm_offset)
        self.qk_norm = qk_norm
        self.window = cfg.window(layer)
        base = cfg.rope_theta
        scaling = cfg.rope_scaling
        if self.window is not None and cfg.rope_local_base_freq is not None:
            base, scaling = cfg.rope_local_base_freq, None
        self.rotary = Rotary(int(d * cfg.partial_rotary_factor), base, scaling, cfg.max_position_embeddings)
        scalar = cfg.query_pre_attn_scalar
        self.scale = (scalar if scalar else d) ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        T, H = x.shape[0], self.n_heads
        if self.qkv_proj is not None:  # installed by the loader: one multiply for q, k and v
            qkv = self.qkv_proj.full(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.view(T, H + 2 * self.n_kv, self.head_dim)  # (T, H + 2 Hkv, D)
        qk, v = qkv[:, : H + self.n_kv], qkv[:, H + self.n_kv:]
        if self.qk_norm:
            q, k = self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])
            q, k = self.rotary(q, batch), self.rotary(k, batch)
        else:  # q and k rotate together
            qk = self.rotary(qk, batch)
            q, k = qk[:, :H], qk[:, H:]
        out = torch.empty_like(q) if len(batch.seqs) > 1 else None
        for i, s in enumerate(batch.seqs):
            ks, vs = k[s.start:s.end], v[s.start:s.end]
            if s.cache is not None:
                ks, vs = s.cache.update(self.layer, ks, vs)  # (Hkv, S, D)
                if self.window is not None and s.end - s.start == 1:
                    ks, vs = ks[:, -self.window:], vs[:, -self.window:]  # a decode sees one window
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
            else:
                ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)
            o = self.attend(q[s.start:s.end], ks, vs, self._mask(batch, i, s, ks.shape[1]))
            if out is None:
                out = o
            else:
                out[s.start:s.end] = o
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))

    def _mask(self, batch: Batch, i: int, s: SeqSlice, n_keys: int) -> torch.Tensor | None:
        """None when every key is visible (a decode step inside the window): SDPA's fast path."""
        q_pos = batch.positions[s.start:s.end]
        spans = batch.image_blocks.get(i) if batch.image_blocks else None
        if spans:  # vision (Gemma 3): an image's rows see each other both ways
            key = ("image-mask", i, self.window, n_keys)
            if key not in batch.memo:
                batch.memo[key] = image_mask(q_pos, n_keys, self.window, spans)
            return batch.memo[key]
        if s.end - s.start == 1 and (self.window is None or n_keys <= self.window):
            return None
        if n_keys == s.end - s.start and (self.window is None or n_keys <= self.window):
            return CAUSAL  # a whole prompt in one chunk
        key = ("mask", i, self.window, n_keys)
        if key not in batch.memo:
            batch.memo[key] = causal_mask(q_pos, n_keys, self.window)
        return batch.memo[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # q: (Tq, H, D), k/v: (Hkv, S, D) -> (Tq, H, D)
        if mask is None and self.softcap is None:
            return self.attend_one(q, k, v)
        qh, kh, vh = q.transpose(0, 1), k, v  # (H, T, D), (Hkv, S, D)
        if self.softcap is None:
            causal = mask is CAUSAL
            rep = self.n_heads // self.n_kv  # SDPA's fused CPU kernels want equal head counts
            kh, vh = kh.repeat_interleave(rep, dim=0), vh.repeat_interleave(rep, dim=0)
            # 4-D inputs: SDPA's CPU flash kernel takes only those (3-D falls back to the math path)
            o = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=None if causal else mask,
                                               is_causal=causal, scale=self.scale)[0]
        else:
            rep = self.n_heads // self.n_kv
            kh, vh = kh.repeat_interleave(rep, dim=0), vh.repeat_interleave(rep, dim=0)
            if mask is None or mask is CAUSAL:
                q_pos = torch.arange(k.shape[1] - q.shape[0], k.shape[1], device=q.device)
                mask = causal_mask(q_pos, k.shape[1], None)
            scores = (qh @ kh.transpose(1, 2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vh
        return o.transpose(0, 1)


    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query over all keys (decode): grouped heads, two small matmuls, no copies."""
        rep = self.n_heads // self.n_kv
        qg = q.view(self.n_kv, rep, self.head_dim)  # (Hkv, rep, D)
        scores = torch.matmul(qg, k.transpose(1, 2)) * self.scale  # (Hkv, rep, S)
        o = torch.matmul(torch.softmax(scores, dim=-1), v)  # (Hkv, rep, D)
        return o.view(1, self.n_heads, self.head_dim)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): llama, mistral, gemma, qwen."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:  # installed by the loader: one multiply for both
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))): starcoder2's non-gated MLP (HF names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def embed_scale(cfg: ModelConfig) -> float:
    return math.sqrt(cfg.hidden_size)
