"""Architectures by HF model_type: a registry that is data."""
from __future__ import annotations

from .base import CausalLM
from .gemma import GemmaForCausalLM
from .gemma2 import Gemma2ForCausalLM
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .phi2 import PhiForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .starcoder2 import Starcoder2ForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # llama with a sliding window (config.sliding_window)
    "mixtral": MixtralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "starcoder2": Starcoder2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi": PhiForCausalLM,
    "phi2": PhiForCausalLM,  # llama.cpp's name
    "phi3": Phi3ForCausalLM,
}
