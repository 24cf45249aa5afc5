"""Mixtral: llama attention (sliding window when configured) with a sparse mixture of experts
in place of the MLP. HF hub names: `block_sparse_moe.gate` (the router) and
`block_sparse_moe.experts.N.w1/w2/w3` (gate, down, up)."""
from __future__ import annotations

import torch
from torch import nn

from .base import CausalLM
from .config import ModelConfig
from .layers import ACTIVATIONS, Attention, Batch, RMSNorm


class MixtralExpert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) logits -> weights and expert ids (T, k): softmax, top-k, renormalized to sum 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(cfg) for _ in range(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, hidden); each expert runs once over the tokens routed to it
        weights, ids = route(self.gate(x), self.top_k)  # (T, k)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out


class MixtralDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.block_sparse_moe = MixtralSparseMoeBlock(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralForCausalLM(CausalLM):
    layer_cls = MixtralDecoderLayer
