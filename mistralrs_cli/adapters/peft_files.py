"""A PEFT LoRA adapter folder -> AdapterFactors: adapter_config.json + adapter_model.safetensors.

peft saves `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
the scale is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. fan_in_fan_out only
describes a GPT-2 style Conv1D base weight; peft turns it off for an nn.Linear target (every module
our models adapt), so the factors are used as stored either way. Every problem is one sentence
naming the file and what to do.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .bank import AdapterFactors, layer_of

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": "DoRA", "rank_pattern": "per-module ranks (rank_pattern)",
                "alpha_pattern": "per-module alphas (alpha_pattern)", "lora_bias": "LoRA biases (lora_bias)"}


def read_json_object(path: Path, fix: str, not_object: str, what: str = "") -> dict[str, Any]:
    """An adapter-side JSON file (adapter config, ordering, xlora_config.json) as a dict: one that
    does not parse is "cannot read <what><path> as JSON (...); <fix>", one that is not an object
    is not_object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what}{path} as JSON ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise UserError(not_object)
    return raw


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{path} does not exist; an adapter folder needs peft's {CONFIG} and {WEIGHTS} "
                        "(written by save_pretrained).")
    cfg = read_json_object(path, "fix the file or save the adapter again.",
                           f"{path} is not a JSON object; save the adapter again with peft.")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise UserError(f"{path} describes a {kind} adapter; only LoRA adapters (peft_type LORA) load here.")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise UserError(f"{path} uses {what}, which is not supported; train the adapter without it.")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{path}: r is {r!r}, not a positive integer; fix the file.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise UserError(f"{path}: lora_alpha is {alpha!r}, not a number; fix the file.")
    return cfg


def scale_of(cfg: dict[str, Any]) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as safetensors ({e}); save the adapter again.") from None
    except TypeError:  # a dtype numpy lacks (bf16): read through torch
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def read_adapter(folder: Path, name: str) -> AdapterFactors:
    """The adapter in `folder` under `name` (the ordering's name for it)."""
    cfg = read_config(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        other = " (it holds adapter_model.bin: save it again with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise UserError(f"{path} does not exist{other}; an adapter folder needs {WEIGHTS} beside {CONFIG}.")
    tensors = _load_tensors(path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"{path} holds {key}, which is not a LoRA factor of a linear layer "
                            "(base_model.model.<module>.lora_A/lora_B.weight); only those load here.")
        module, part = key[len(PREFIX):].rsplit(".", 2)[:2]
        pairs.setdefault(module, {})[part] = t
    factors = {}
    for module, p in sorted(pairs.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise UserError(f"{path} has only {', '.join(p)} for {module}; the file is incomplete, save it again.")
        A, B = np.asarray(p["lora_A"], np.float32), np.asarray(p["lora_B"], np.float32)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{path}: {module}'s lora_A {list(A.shape)} and lora_B {list(B.shape)} do not "
                            "chain (A: rank x in, B: out x rank); the file is damaged.")
        try:
            layer_of(module)
        except ValueError:
            raise UserError(f"{path} adapts {module}, which is not a linear layer inside a decoder layer; "
                            "only model.layers.N.* modules can carry adapters here.") from None
        factors[module] = (np.ascontiguousarray(A), np.ascontiguousarray(B))
    if not factors:
        raise UserError(f"{path} holds no LoRA factors; save the adapter again.")
    return AdapterFactors(name, scale_of(cfg), factors)


def check_fits(adapter: AdapterFactors, folder: Path, shapes: dict[str, tuple[int, int]], arch: str) -> None:
    """Every adapted module exists in the loaded model with the factors' sizes: shapes is
    {HF module: (out_features, in_features)}."""
    path = folder / WEIGHTS
    for module, (A, B) in adapter.factors.items():
        if module not in shapes:
            raise UserError(f"{path} adapts {module}, which the loaded {arch} model does not have; "
                            "use an adapter trained for this base model.")
        out_f, in_f = shapes[module]
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise UserError(f"{path}: {module} maps {A.shape[1]} -> {B.shape[0]} features but the loaded "
                            f"model's {module} maps {in_f} -> {out_f}; the adapter was built for another "
                            "model size, use one trained for this base model.")
