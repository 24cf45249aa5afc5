"""Qwen3: llama with a plain RMSNorm over each head of q and k before rotary, no qkv bias."""
from __future__ import annotations

from .base import CausalLM
from .config import ModelConfig
from .llama import LlamaDecoderLayer
from .qwen2 import qwen_window_config


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attn_options = {"qk_norm": True}


class Qwen3ForCausalLM(CausalLM):
    layer_cls = Qwen3DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__(qwen_window_config(cfg))
