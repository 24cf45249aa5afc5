"""StarCoder2: LayerNorm with bias (`norm_epsilon`), biases on q/k/v/o and on a non-gated MLP
(`use_bias`), `mlp.c_fc` -> gelu tanh -> `mlp.c_proj`, and a sliding window when configured."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import Attention, Batch, LayerNorm, PlainMLP


def starcoder2_config(cfg: ModelConfig) -> ModelConfig:
    """config.json names: norm_epsilon for the LayerNorms, use_bias for every linear but lm_head."""
    bias = bool(cfg.extra.get("use_bias", True))
    eps = float(cfg.extra.get("norm_epsilon", cfg.layer_norm_eps))
    return dataclasses.replace(cfg, layer_norm_eps=eps, attention_bias=bias, mlp_bias=bias)


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)  # biased o_proj: attention_bias
        self.mlp = PlainMLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class Starcoder2ForCausalLM(CausalLM):
    layer_cls = Starcoder2DecoderLayer

    def __init__(self, cfg: ModelConfig):
        cfg = starcoder2_config(cfg)
        super().__init__(cfg)
        self.model.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
