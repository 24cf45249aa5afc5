"""`plain`: a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json).

Tensor names are HF hub names, so loading is config.json -> ModelConfig (accepting both the
hub spelling and transformers 5's `rope_parameters`/`dtype`) and memory-mapped safetensors handed
to build_model. A checkpoint in transformers 5's in-memory layout (a state_dict written as is:
Mixtral's experts stacked, gate and up fused) is brought to the hub names by two data tables,
RENAMES and SPLITS. Nothing is quantized, so the numerics are exact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import hub
from ..errors import UserError
from ..models import ARCHITECTURES
from ..models.config import ModelConfig
from ..models.gemma3 import gemma3_layer_types
from ..models.layers import ROPE_INV_FREQ
from ..types import LoadOptions, PlainSpec
from .weights import DTYPES, build_model, fuse_float_projections, set_dtype

# config.json architectures[0] -> HF model_type (the ARCHITECTURES key)
MODEL_TYPES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3_text",  # its text part
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Starcoder2ForCausalLM": "starcoder2",
}
ARCH_ALIASES = {"phi2": "phi", "gemma3": "gemma3_text"}  # mistral.rs's --arch names
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# weight-name prefixes of multimodal checkpoints whose text model we run
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."), ("model.text_model.", "model."))  # last: Idefics
FILES = ["*.json", "model*.safetensors", "chat_template.jinja"]
# transformers 5 in-memory names -> hub names (our modules'), by model_type: substring rewrites
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.gate.weight", ".block_sparse_moe.gate.weight"),),
}
# a stacked tensor `<layer prefix><suffix>` of shape (experts, parts * rows, cols) -> per expert e,
# its equal row blocks (dim 1) in order, named `<layer prefix><part>` with {e} filled in
SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {
        ".mlp.experts.gate_up_proj": (".block_sparse_moe.experts.{e}.w1.weight",   # gate
                                      ".block_sparse_moe.experts.{e}.w3.weight"),  # up
        ".mlp.experts.down_proj": (".block_sparse_moe.experts.{e}.w2.weight",),
    },
}


def supported() -> str:
    return ", ".join(sorted({t for t in MODEL_TYPES.values() if t in ARCHITECTURES} | {
        a for a, t in ARCH_ALIASES.items() if t in ARCHITECTURES}))


def model_type(arch: str | None, raw: dict[str, Any], config_path: Path) -> str:
    if arch is not None:
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        name = MODEL_TYPES.get(arch, name)
        if name not in ARCHITECTURES:
            raise UserError(f"--arch {arch} is not supported; supported architectures: {supported()}.")
        return name
    archs = raw.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name is None:
        raise UserError(f"{config_path} has no `architectures` entry; name the architecture with "
                        f"--arch (supported: {supported()}).")
    if MODEL_TYPES.get(name) not in ARCHITECTURES:
        raise UserError(f"{config_path}: architecture {name} is not supported yet; supported "
                        f"architectures: {supported()}.")
    return MODEL_TYPES[name]


# rope scaling kinds an architecture implements itself, beyond the shared ROPE_INV_FREQ table
OWN_ROPE_KINDS: dict[str, tuple[str, ...]] = {"phi3": ("longrope", "su")}


def _rope_fields(d: dict[str, Any], mtype: str) -> None:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer kind for Gemma 3);
    the hub spelling has rope_theta / rope_scaling / rope_local_base_freq at top level."""
    params = d.pop("rope_parameters", None)
    if isinstance(params, dict) and params:
        full = params.get("full_attention", params)
        sliding = params.get("sliding_attention")
        if isinstance(sliding, dict) and "rope_theta" in sliding:
            d.setdefault("rope_local_base_freq", sliding["rope_theta"])
        if "rope_theta" in full:
            d.setdefault("rope_theta", full["rope_theta"])
        if "partial_rotary_factor" in full:
            d.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
        if full.get("rope_type", full.get("type", "default")) != "default":
            d.setdefault("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"})
    scaling = d.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_INV_FREQ and kind not in OWN_ROPE_KINDS.get(mtype, ()):
        raise UserError(f"config.json: rope scaling type {kind!r} is not supported yet (supported: "
                        f"{', '.join(sorted(ROPE_INV_FREQ))}).")


def plain_config(raw: dict[str, Any], mtype: str, config_path: Path) -> ModelConfig:
    d = dict(raw.get("text_config") or raw)  # multimodal configs nest the text model
    d.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", mtype.startswith("gemma")))
    for key in REQUIRED:
        if d.get(key) is None:
            raise UserError(f"{config_path} lacks the required field {key}; the config is incomplete.")
        if not isinstance(d[key], int) or d[key] <= 0:
            raise UserError(f"{config_path}: field {key} must be a positive integer, got {d[key]!r}.")
    d["model_type"] = mtype
    if "hidden_activation" in d:  # Gemma's name for it
        d["hidden_act"] = d.pop("hidden_activation")
    if d.get("use_sliding_window") is False:  # Qwen2 ships a window it does not use
        d["sliding_window"] = None
    for key in ("head_dim", "num_key_value_heads"):
        if d.get(key) is None:
            d.pop(key, None)
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    _rope_fields(d, mtype)
    if mtype == "gemma3_text":
        if d.get("layer_types") is None:
            d["layer_types"] = gemma3_layer_types(d["num_hidden_layers"], d.get("sliding_window_pattern", 6))
        d.setdefault("rope_local_base_freq", 10000.0)
        d.setdefault("rope_theta", 1_000_000.0)
        d.setdefault("hidden_act", "gelu_pytorch_tanh")
        d.setdefault("query_pre_attn_scalar", d.get("head_dim") or 256)
    layer_types = d.get("layer_types")
    if layer_types is not None and len(layer_types) != d["num_hidden_layers"]:
        raise UserError(f"{config_path}: layer_types has {len(layer_types)} entries for "
                        f"{d['num_hidden_layers']} layers; fix the config.")
    return ModelConfig.from_dict(d)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {index} ({e!r}); fix or remove the file.") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no .safetensors weights (model.safetensors or "
                        "model-0000x-of-0000y.safetensors); pass a directory that has them.")
    for f in files:
        if not f.is_file():
            raise UserError(f"weight file {f} named in {index.name} does not exist; the download is "
                            "incomplete.")
    return files


def _text_name(name: str) -> str | None:
    for prefix, repl in TEXT_PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name if name.startswith(("model.", "lm_head.")) else None


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every text-model tensor, memory-mapped (safe_open reads a tensor's bytes when asked)."""
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    target = _text_name(name)
                    if target is not None:
                        weights[target] = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"cannot read {path} as safetensors ({e}); the file is damaged or "
                            "incomplete.") from None
    return weights


def hub_names(weights: dict[str, torch.Tensor], mtype: str, source: str) -> dict[str, torch.Tensor]:
    """Rename and split transformers 5's in-memory layout into hub names (views, no copies);
    hub-named tensors pass through."""
    renames, splits = RENAMES.get(mtype, ()), SPLITS.get(mtype, {})
    if not renames and not splits:
        return weights
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        suffix = next((s for s in splits if name.endswith(s)), None)
        if suffix is None:
            for old, new in renames:
                name = name.replace(old, new)
            out[name] = w
            continue
        parts, prefix = splits[suffix], name[: -len(suffix)]
        if w.dim() != 3 or w.shape[1] % len(parts):
            raise UserError(f"{source}: stacked tensor {name} has shape {list(w.shape)}; expected "
                            f"(experts, {len(parts)} x rows, cols). The file is damaged or not of "
                            "this architecture.")
        for e in range(w.shape[0]):
            for part, block in zip(parts, w[e].chunk(len(parts), dim=0)):
                out[prefix + part.format(e=e)] = block
    return out


def _model_dir(spec: PlainSpec, opts: LoadOptions) -> Path:
    model_dir = hub.resolve_model_dir(spec.model_id, opts.token_source, FILES, flag="-m/--model-id")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"config.json is not in the model directory {model_dir}; -m must name a "
                        "Hugging Face checkpoint (config.json + safetensors).")
    return model_dir


def load_plain_model(spec: PlainSpec, opts: LoadOptions, model_dir: Path) -> tuple[torch.nn.Module, ModelConfig]:
    config_path = model_dir / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path} as JSON ({e}); fix the file.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path} is not a JSON object; fix the file.")
    mtype = model_type(spec.arch, raw, config_path)
    cfg = plain_config(raw, mtype, config_path)
    weights = hub_names(read_weights(_weight_files(model_dir)), mtype, str(model_dir))
    # as transformers 5: an lm_head in the file is used even when the config says tied (it then
    # declines to tie); without one the embeddings serve
    cfg.tie_word_embeddings = "lm_head.weight" not in weights
    dtype = DTYPES.get(opts.dtype, torch.float32)
    model = build_model(ARCHITECTURES[mtype], cfg, weights, source=str(model_dir), dtype=dtype)
    set_dtype(model, opts.dtype)
    fuse_float_projections(model)
    return model, cfg


def _tokenizer_files(spec: PlainSpec, model_dir: Path) -> tuple[Path, dict, dict]:
    from .loaded import read_json as _read_json

    tok_json = Path(spec.tokenizer_json).expanduser() if spec.tokenizer_json else model_dir / "tokenizer.json"
    if not tok_json.is_file():
        how = "check -t/--tokenizer-json" if spec.tokenizer_json else "add it or pass one with -t/--tokenizer-json"
        raise UserError(f"tokenizer file {tok_json} does not exist; {how}.")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json" if (model_dir / "tokenizer_config.json").is_file() else None) or {}
    jinja = model_dir / "chat_template.jinja"  # transformers 5 writes the template beside the config
    if not tok_cfg.get("chat_template") and jinja.is_file():
        tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    gen_path = model_dir / "generation_config.json"
    gen_cfg = _read_json(gen_path if gen_path.is_file() else None)
    return tok_json, tok_cfg, gen_cfg if isinstance(gen_cfg, dict) else {}


def load_plain(spec: PlainSpec, opts: LoadOptions):
    """`mistralrs plain -m DIR_OR_REPO`: the Loaded bundle (imported late: load.py registers us)."""
    from .chat_template import resolve_chat_template
    from ..sampling_defaults import from_generation_config
    from .loaded import Loaded
    from .tokenizer import tokenizer_from_file

    model_dir = _model_dir(spec, opts)
    tok_json, tok_cfg, gen_cfg = _tokenizer_files(spec, model_dir)
    model, cfg = load_plain_model(spec, opts, model_dir)
    eos = gen_cfg.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    tok = tokenizer_from_file(tok_json, tok_cfg, eos)
    template = resolve_chat_template(opts.chat_template, tok_cfg, None)
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    return Loaded(model, tok, template, cfg, spec.model_id, set(tok.eos_ids), bos or "", eos or "",
                  from_generation_config(gen_cfg))
