"""Llama (and the many checkpoints that share its shape: SmolLM2, TinyLlama, ...)."""
from __future__ import annotations

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import Attention, Batch, GatedMLP, RMSNorm


class LlamaDecoderLayer(nn.Module):
    attn_options: dict = {}  # variants that differ only in attention (qwen2's bias, qwen3's q/k norms)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer, **self.attn_options)
        self.mlp = GatedMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CausalLM):
    layer_cls = LlamaDecoderLayer
