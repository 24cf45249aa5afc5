"""Gemma 3 (text): q/k norms, four norms per block, (1 + w) RMSNorm, scaled embeddings, and
interleaved sliding-window (local rope base) and global attention layers."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig, gemma3_layer_types  # noqa: F401 (re-exported)
from .layers import Attention, Batch, GatedMLP, RMSNorm


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer, qk_norm=True, norm_offset=1.0)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(d, eps, 1.0)
        self.post_attention_layernorm = RMSNorm(d, eps, 1.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, 1.0)
        self.post_feedforward_layernorm = RMSNorm(d, eps, 1.0)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(CausalLM):
    layer_cls = Gemma3DecoderLayer
    norm_offset = 1.0
    unsupported_dtypes = {"f16": "Gemma 3's activations overflow float16"}

    def embed_multiplier(self) -> float:
        return math.sqrt(self.config.hidden_size)
