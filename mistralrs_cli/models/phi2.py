"""Phi-2 (HF model_type "phi"): one LayerNorm feeds attention and the MLP in parallel,
`x + attn(ln(x)) + mlp(ln(x))`; partial rotary; biases everywhere; the attention output is
`self_attn.dense`, the MLP `fc1 -> gelu_new -> fc2`, the final norm `model.final_layernorm`."""
from __future__ import annotations

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import ACTIVATIONS, Attention, Batch, LayerNorm


class PhiAttention(Attention):
    """Attention with q/k/v biases whose output projection is called `dense` (with a bias)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer, qkv_bias=True)
        del self.o_proj  # Attention.forward calls self.o_proj: the method below
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=True)

    def o_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class PhiMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = PhiAttention(cfg, layer)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, batch) + self.mlp(h)


class PhiForCausalLM(CausalLM):
    layer_cls = PhiDecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # HF's name is final_layernorm; CausalLM.forward reads model.norm: one module, two names
        # (a LayerNorm is never swapped by a loader, so the alias cannot go stale)
        self.model.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.model.final_layernorm = self.model.norm
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
