"""Architectures by HF model_type: a registry that is data."""
from __future__ import annotations

from .base import CausalLM
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}
