"""Gemma (1): llama's block with GeGLU (gelu tanh), (1 + w) RMSNorm, embeddings scaled by
sqrt(hidden) and a tied lm_head; head_dim comes from the config (256 on the 7B, not hidden/heads)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import Attention, Batch, GatedMLP, RMSNorm


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, 1.0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, 1.0)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaForCausalLM(CausalLM):
    layer_cls = GemmaDecoderLayer
    norm_offset = 1.0
    unsupported_dtypes = {"f16": "Gemma's activations overflow float16"}

    def embed_multiplier(self) -> float:
        return math.sqrt(self.config.hidden_size)
