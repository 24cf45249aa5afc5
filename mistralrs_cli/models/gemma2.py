"""Gemma 2: Gemma 3's four-norm block without q/k norms, attention logits and final logits
soft-capped (tanh), queries scaled by query_pre_attn_scalar ** -0.5, and sliding-window and
global layers alternating (even layers slide)."""
from __future__ import annotations

import dataclasses

from .config import ModelConfig
from .gemma import GemmaForCausalLM
from .gemma3 import Gemma3DecoderLayer
from .layers import Attention


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.self_attn = Attention(cfg, layer)  # no q/k norms


def gemma2_layer_types(n_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


class Gemma2ForCausalLM(GemmaForCausalLM):
    layer_cls = Gemma2DecoderLayer

    def __init__(self, cfg: ModelConfig):
        if cfg.layer_types is None:
            cfg = dataclasses.replace(cfg, layer_types=gemma2_layer_types(cfg.num_hidden_layers))
        super().__init__(cfg)
