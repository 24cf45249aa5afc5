"""Qwen2: llama with biases on q, k and v (not o), and a sliding window only when asked for."""
from __future__ import annotations

import dataclasses

from .base import CausalLM
from .config import ModelConfig
from .llama import LlamaDecoderLayer


def qwen_window_config(cfg: ModelConfig) -> ModelConfig:
    """Hub configs carry `sliding_window` even with `use_sliding_window: false`; as transformers
    does, slide only when enabled, and then only in layers from `max_window_layers` on."""
    if cfg.layer_types is not None:
        return cfg
    if not cfg.extra.get("use_sliding_window", False) or cfg.sliding_window is None:
        return dataclasses.replace(cfg, sliding_window=None)
    start = int(cfg.extra.get("max_window_layers", cfg.num_hidden_layers))
    types = ["sliding_attention" if i >= start else "full_attention" for i in range(cfg.num_hidden_layers)]
    return dataclasses.replace(cfg, layer_types=types)


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attn_options = {"qkv_bias": True, "o_bias": False}


class Qwen2ForCausalLM(CausalLM):
    layer_cls = Qwen2DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__(qwen_window_config(cfg))
