"""What a request gets for the sampling fields it leaves unset, in every mode (--prompt, -i, the
Python Runner, the HTTP server), so that an instruction ends by itself.

Greedy decoding of small chat models loops ("A silver thread, a silver thread, ...") until the
context is full. So the defaults are chat sampling as llama.cpp's defaults (temperature 0.8,
top-k 40, top-p 0.95, min-p 0.05) with Ollama's repetition guard (penalty 1.1 over the last 64
tokens); scripts/defaults_sweep.py measured them on both real models. The model's
generation_config.json (plain checkpoints, or the -t tokenizer source of a GGUF) wins field by
field where it sets one, as vLLM reads it (do_sample is not read). Temperature 0 is plain greedy:
no default penalty then, only one asked for.
"""
from __future__ import annotations

import math
from typing import Any

from .types import SamplingParams

CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                 "repetition_penalty": 1.1, "repeat_last_n": 64}
# generation_config.json key -> SamplingParams field
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                            "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                            "max_new_tokens": "max_tokens"}
_INTEGER = ("top_k", "max_tokens")


def from_generation_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling fields a generation_config.json sets (values that are not finite numbers >= 0
    are left out, so a malformed file falls back to the defaults)."""
    out: dict[str, Any] = {}
    for key, name in GENERATION_CONFIG_FIELDS.items():
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            out[name] = int(value) if name in _INTEGER else float(value)
    return out


def defaults(generation_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults for a model: CHAT_DEFAULTS under the fields its generation_config.json sets."""
    return {**CHAT_DEFAULTS, **(generation_config or {})}


def sampling_params(explicit: dict[str, Any], generation_config: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from the fields a request or the command line set (None: unset) over the
    model's defaults."""
    given = {k: v for k, v in explicit.items() if v is not None}
    merged = {**defaults(generation_config), **given}
    if merged["temperature"] < 1e-7 and "repetition_penalty" not in {**(generation_config or {}), **given}:
        merged["repetition_penalty"] = None  # greedy is the model's own argmax
    return SamplingParams(**merged)
