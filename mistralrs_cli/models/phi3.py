"""Phi-3: llama with HF's fused projections kept fused (`self_attn.qkv_proj` = q|k|v rows,
`mlp.gate_up_proj` = gate|up rows) and LongRoPE ("longrope", formerly "su") scaling."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import ACTIVATIONS, Attention, Batch, RMSNorm, Rotary


def longrope_params(cfg: ModelConfig) -> tuple[int, float]:
    """(original context length, attention factor), as transformers derives them."""
    s = cfg.rope_scaling or {}
    orig = int(s.get("original_max_position_embeddings")
               or cfg.extra.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    factor = s.get("factor") or cfg.max_position_embeddings / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return orig, float(attn)


class LongRope(Rotary):
    """Per-frequency divisors: `short_factor` while every position is within the original
    context, `long_factor` once one is beyond it (as transformers decides per forward);
    cos and sin are scaled by the attention factor."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scaling: dict[str, Any] = dict(cfg.rope_scaling or {})
        self.orig, self.attn_factor = longrope_params(cfg)
        super().__init__(dim, cfg.rope_theta, None)

    def reset(self) -> None:
        super().reset()
        base = self.inv_freq  # 1 / theta^(2i/dim)
        self.short = base / torch.tensor(self.scaling["short_factor"], dtype=torch.float32, device="cpu")
        self.long = base / torch.tensor(self.scaling["long_factor"], dtype=torch.float32, device="cpu")

    def tables(self, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        long = int(batch.positions.max()) + 1 > self.orig
        key = ("longrope", long, self.dim, dtype)
        if key not in batch.memo:
            inv = self.long if long else self.short
            freqs = batch.positions.float()[:, None] * inv[None, :]  # (T, dim/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
            sin = freqs.sin()[:, None, :] * self.attn_factor
            signed = torch.cat([-sin, sin], dim=-1)
            batch.memo[key] = ((emb.cos() * self.attn_factor).to(dtype),
                               (emb.sin() * self.attn_factor).to(dtype), signed.to(dtype))
        return batch.memo[key]


def is_longrope(cfg: ModelConfig) -> bool:
    s = cfg.rope_scaling or {}
    return s.get("rope_type", s.get("type")) in ("longrope", "su")


class Phi3Attention(Attention):
    def __init__(self, cfg: ModelConfig, layer: int):
        longrope = is_longrope(cfg)
        super().__init__(dataclasses.replace(cfg, rope_scaling=None) if longrope else cfg, layer)
        del self.q_proj, self.k_proj, self.v_proj
        out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, out, bias=cfg.attention_bias)
        if longrope:
            self.rotary = LongRope(self.rotary.dim, cfg)

    def reset(self) -> None:
        """Attention.forward calls qkv_proj.full(x): give whatever module the loader put here
        (a Linear or a QLinear) that name for its plain call."""
        if not hasattr(self.qkv_proj, "full"):
            self.qkv_proj.full = self.qkv_proj.__call__


class Phi3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Phi3Attention(cfg, layer)
        self.mlp = Phi3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3ForCausalLM(CausalLM):
    layer_cls = Phi3DecoderLayer
