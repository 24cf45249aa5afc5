"""Architectures by HF model_type: a registry that is data.

Imported lazily (module __getattr__): `models.config` is read by the torch-free GGUF runtime, and
importing this package must not pull in torch for it."""
from __future__ import annotations

from typing import Any

# HF model_type -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaForCausalLM"),  # llama with a sliding window (config.sliding_window)
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "starcoder2": ("starcoder2", "Starcoder2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
    "gemma3": ("gemma3", "Gemma3ForCausalLM"),
    "phi": ("phi2", "PhiForCausalLM"),
    "phi2": ("phi2", "PhiForCausalLM"),  # llama.cpp's name
    "phi3": ("phi3", "Phi3ForCausalLM"),
}
_CLASSES = {cls: mod for mod, cls in _REGISTRY.values()} | {"CausalLM": "base"}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "ARCHITECTURES":
        table = {kind: getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
                 for kind, (mod, cls) in _REGISTRY.items()}
        globals()["ARCHITECTURES"] = table
        return table
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(name)
