"""X-LoRA: a classifier that mixes LoRA adapters per token, in numpy (no torch: the native runtime
runs it too).

An X-LoRA model directory holds xlora_config.json, xlora_classifier.safetensors and one folder of
PEFT LoRA files per adapter. Each step first runs the model with every adapter weighed by
`scaling_pass_value` (0: the base model); the classifier reads that pass's final hidden states
(after the output norm) and gives per-token scalings (n_slots, n_adapters), softmaxed with
`softmax_temperature`; the real pass then weighs each adapter by its scaling (only the `top_k_lora`
largest kept) times `global_scaling_weight`. A slot is one adapted module: peft's classifier gives
every LoRA-wrapped linear layer its own scalings when `layerwise_scalings` is set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .peft_files import read_json_object

CONFIG_FILE, CLASSIFIER_FILE = "xlora_config.json", "xlora_classifier.safetensors"


@dataclass
class XLoraConfig:
    """xlora_config.json, with peft's and mistral.rs's field names and defaults."""

    hidden_size: int
    adapters: list[str]  # in classifier order (the keys of peft's `adapters` dict)
    base_model_id: str | None = None
    layerwise_scalings: bool = False
    enable_relu_and_dropout: bool = False
    use_bias: bool = True
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0


_TYPES = {"hidden_size": int, "xlora_depth": int, "xlora_size": int, "top_k_lora": int,
          "layerwise_scalings": bool, "enable_relu_and_dropout": bool, "use_bias": bool,
          "enable_softmax": bool, "enable_softmax_topk": bool, "xlora_dropout_p": float,
          "softmax_temperature": float, "scaling_pass_value": float, "global_scaling_weight": float}


def read_config(folder: Path) -> XLoraConfig:
    """Parse `folder`/xlora_config.json; every problem is one sentence naming the file and field."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {CONFIG_FILE}; -x/--xlora-model-id must name an X-LoRA model "
                        f"folder (xlora_config.json, {CLASSIFIER_FILE} and one folder per adapter).")
    raw = read_json_object(path, "fix the file.", f"{path} must hold a JSON object.")
    known = {f.name for f in fields(XLoraConfig)}
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known or value is None:
            continue  # peft writes more (peft_type, task_type, ...): not ours to check
        kw[key] = _field(path, key, value)
    for key in ("hidden_size", "adapters"):
        if key not in kw:
            raise UserError(f"{path} has no `{key}`; an X-LoRA config needs it (peft's XLoraConfig writes it).")
    cfg = XLoraConfig(**kw)
    _check(path, cfg)
    return cfg


def _field(path: Path, key: str, value: Any) -> Any:
    if key == "adapters":  # peft: {name: path}; mistral.rs also takes a list of names
        names = list(value) if isinstance(value, (dict, list)) else None
        if not names or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"{path}: `adapters` must be a non-empty list or object of adapter names.")
        return names
    if key == "base_model_id":
        return str(value)
    want = _TYPES.get(key)
    ok = isinstance(value, bool) if want is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or value == int(value)))
    if not ok:
        raise UserError(f"{path}: `{key}` must be {'true or false' if want is bool else 'a number'}, got {value!r}.")
    return want(value)


def _check(path: Path, cfg: XLoraConfig) -> None:
    n = len(cfg.adapters)
    if len(set(cfg.adapters)) != n:
        raise UserError(f"{path}: `adapters` names repeat ({cfg.adapters}); give each adapter its own name.")
    if cfg.xlora_depth < 1:
        raise UserError(f"{path}: `xlora_depth` must be at least 1, got {cfg.xlora_depth}.")
    if cfg.top_k_lora is not None and not 1 <= cfg.top_k_lora <= n:
        raise UserError(f"{path}: `top_k_lora` must be between 1 and the {n} adapters, got {cfg.top_k_lora}.")
    if cfg.enable_softmax and not cfg.softmax_temperature > 0:
        raise UserError(f"{path}: `softmax_temperature` must be above 0, got {cfg.softmax_temperature}.")
    if cfg.hidden_size < 1:
        raise UserError(f"{path}: `hidden_size` must be positive, got {cfg.hidden_size}.")


# peft numbers its X-LoRA layers in model.modules() order: by decoder layer, then in the order the
# architectures register their projections (Phi-3 registers o_proj before qkv_proj)
_MODULE_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "self_attn.qkv_proj", "self_attn.dense", "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj",
                 "mlp.down_proj", "mlp.fc1", "mlp.fc2", "mlp.c_fc", "mlp.c_proj"]
_PHI3 = {"self_attn.o_proj": 3.5, "self_attn.qkv_proj": 3.6}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.*)$")


def module_slots(modules: list[str], layers: dict[str, int] | None = None) -> dict[str, int]:
    """Each adapted module's scalings slot: the ordering file's `layers` map when given (as
    mistral.rs), else peft's order (decoder layer, then registration order)."""
    if layers:
        missing = [m for m in modules if m not in layers]
        if missing:
            raise UserError(f"the ordering file's `layers` lacks {missing[:3]} that the adapters target; "
                            "regenerate the ordering (scripts/create_ordering.py) from these adapters.")
        return {m: int(layers[m]) for m in modules}
    fused = any(m.endswith("qkv_proj") for m in modules)

    def key(m: str) -> tuple:
        g = _LAYER.search(m)
        layer, rest = (int(g.group(1)), g.group(2)) if g else (-1, m)
        pos = (_PHI3.get(rest) if fused else None) or (
            _MODULE_ORDER.index(rest) if rest in _MODULE_ORDER else len(_MODULE_ORDER))
        return layer, pos, rest
    return {m: i for i, m in enumerate(sorted(modules, key=key))}


_KEY = re.compile(r"(?:^|\.)(layers|inner)\.(\d+)\.(weight|bias)$|(?:^|\.)(last)\.(weight|bias)$")


class XLoraClassifier:
    """The classifier's linear layers in float32 numpy, read from xlora_classifier.safetensors in
    either layout: peft's (`...layers.N.weight`, a ReLU between every two linears) or the X-LoRA
    library's that mistral.rs reads (`inner.N`, `last`; ReLU only with enable_relu_and_dropout).
    Dropout is inactive at inference."""

    def __init__(self, config: XLoraConfig, tensors: dict[str, np.ndarray], n_slots: int, source: str = CLASSIFIER_FILE):
        self.config, self.n_slots, self.n_classes = config, n_slots, len(config.adapters)
        # --tgt-non-granular-index, set by the loader: the engine reads it (engine/xlora_step.py)
        self.tgt_non_granular_index: int | None = None
        self.layers, relu = _linears(tensors, config, source)
        self.relu = relu
        want = self.n_classes * (n_slots if config.layerwise_scalings else 1)
        out, inp = self.layers[-1][0].shape[0], self.layers[0][0].shape[1]
        if out != want:
            how = (f"{self.n_classes} adapters x {n_slots} adapted modules (layerwise_scalings)"
                   if config.layerwise_scalings else f"{self.n_classes} adapters")
            raise UserError(f"{source}'s last layer gives {out} outputs but this X-LoRA model needs {want} "
                            f"({how} in {CONFIG_FILE}); the classifier was trained for other adapters.")
        if inp != config.hidden_size:
            raise UserError(f"{source}'s first layer reads {inp} features but {CONFIG_FILE} says "
                            f"hidden_size {config.hidden_size}; the files belong to different models.")

    def scalings(self, hidden: np.ndarray) -> np.ndarray:
        """Final hidden states (T, hidden) -> scalings (T, n_slots, n_classes), softmaxed when
        enable_softmax (peft's get_latest_scalings)."""
        x = np.asarray(hidden, dtype=np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T
            if b is not None:
                x = x + b
            if i < len(self.layers) - 1 and self.relu:
                x = np.maximum(x, np.float32(0))
        T, c = x.shape[0], self.config
        if c.layerwise_scalings:
            x = x.reshape(T, self.n_slots, self.n_classes)
        else:
            x = np.broadcast_to(x[:, None, :], (T, self.n_slots, self.n_classes))
        if c.enable_softmax:
            x = _softmax(x / np.float32(c.softmax_temperature))
        return np.ascontiguousarray(x, dtype=np.float32)

    def adapter_weights(self, scalings: np.ndarray) -> np.ndarray:
        """Scalings (T, n_slots, n_classes) -> a forward's weights (n_slots, T, n_classes): each
        slot's top_k_lora kept (softmaxed again with enable_softmax_topk), times global_scaling_weight."""
        c, s = self.config, np.asarray(scalings, dtype=np.float32)
        if c.top_k_lora is not None:
            # torch.topk's order on ties (the lower index first), which a stable sort gives
            top = np.argsort(-s, axis=-1, kind="stable")[..., :c.top_k_lora]
            mask = np.zeros(s.shape, dtype=bool)
            np.put_along_axis(mask, top, True, axis=-1)
            s = s * mask
        if c.enable_softmax_topk:
            nz = s != 0
            s = np.where(nz, _softmax(np.where(nz, s, -np.inf)), np.float32(0))
        w = s * np.float32(c.global_scaling_weight)
        return np.ascontiguousarray(w.transpose(1, 0, 2), dtype=np.float32)

    def scaling_pass_weights(self, T: int) -> np.ndarray | None:
        """The scaling pass's weights (n_slots, T, n_classes): every scaling = scaling_pass_value,
        through the same top-k and global weight (as peft's dummy scalings); None when all zero."""
        if self.config.scaling_pass_value == 0:
            return None
        s = np.full((T, self.n_slots, self.n_classes), self.config.scaling_pass_value, dtype=np.float32)
        return self.adapter_weights(s)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _linears(tensors: dict[str, np.ndarray], cfg: XLoraConfig, source: str) -> tuple[list, bool]:
    """[(W (out, in), b or None)] in order, and whether a ReLU follows each but the last."""
    found: dict[tuple, dict[str, np.ndarray]] = {}
    layouts = set()
    for name, t in tensors.items():
        m = _KEY.search(name)
        if m is None:
            continue
        kind, idx, part = (m.group(1), int(m.group(2)), m.group(3)) if m.group(1) else ("inner", 10**9, m.group(5))
        layouts.add("peft" if kind == "layers" else "xlora")
        found.setdefault((idx,), {})[part] = np.ascontiguousarray(t, dtype=np.float32)
    if not found or len(layouts) != 1:
        raise UserError(f"{source} holds no classifier layers (`layers.N.weight`, or `inner.N` and "
                        f"`last`); pass the X-LoRA model's own classifier file.")
    layers = []
    for key in sorted(found):
        part = found[key]
        if "weight" not in part or part["weight"].ndim != 2:
            raise UserError(f"{source}: classifier layer {key[0]} has no 2-D weight; the file is damaged.")
        if cfg.use_bias and "bias" not in part:
            raise UserError(f"{source}: classifier layer {key[0]} has no bias but {CONFIG_FILE} says "
                            "use_bias; set \"use_bias\": false or pass the matching classifier.")
        layers.append((part["weight"], part.get("bias")))
    if len(layers) != cfg.xlora_depth:
        raise UserError(f"{source} has {len(layers)} linear layers but {CONFIG_FILE} says xlora_depth "
                        f"{cfg.xlora_depth}; the files belong to different X-LoRA models.")
    for (w0, _), (w1, _) in zip(layers, layers[1:]):
        if w1.shape[1] != w0.shape[0]:
            raise UserError(f"{source}: a classifier layer gives {w0.shape[0]} features but the next "
                            f"reads {w1.shape[1]}; the file is damaged.")
    peft = layouts == {"peft"}
    return layers, peft or cfg.enable_relu_and_dropout


def load_classifier(folder: Path, config: XLoraConfig, n_slots: int) -> XLoraClassifier:
    path = folder / CLASSIFIER_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {CLASSIFIER_FILE}; an X-LoRA model folder needs its trained "
                        "classifier (save the XLoraModel's internal_xlora_classifier state_dict there).")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"cannot read {path} as safetensors ({e}); pass the X-LoRA model's classifier file.") from None
    return XLoraClassifier(config, tensors, n_slots, source=str(path))
