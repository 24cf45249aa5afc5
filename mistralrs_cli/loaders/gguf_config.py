"""GGUF metadata -> ModelConfig: which keys map to which config fields, per architecture.

torch-free: the native CPU runtime (backends/native_model.py) builds its model from this too.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import UserError
from ..models.config import ModelConfig, gemma3_layer_types, yarn_mscale
from .gguf_checks import check_blocks, check_tensors
from .gguf_values import BadValue, MissingKey, describe, meta_float, meta_int
from .gguf_file import GGUFFile


class _Unsupported(ValueError):
    pass


def _heads(meta: dict[str, Any], arch: str) -> tuple[int, int, int, int]:
    """(hidden, heads, kv heads, head dim), checked against each other: the KV heads divide the
    heads, and without an explicit key_length the heads divide the hidden size."""
    hidden = meta_int(meta, f"{arch}.embedding_length")
    heads = meta_int(meta, f"{arch}.attention.head_count")
    kv = meta_int(meta, f"{arch}.attention.head_count_kv", heads)
    if heads % kv:
        raise BadValue(f"{arch}.attention.head_count_kv {kv} does not divide "
                        f"{arch}.attention.head_count {heads}")
    if f"{arch}.attention.key_length" not in meta and hidden % heads:
        raise BadValue(f"{arch}.attention.head_count {heads} does not divide "
                        f"{arch}.embedding_length {hidden}")
    head_dim = meta_int(meta, f"{arch}.attention.key_length", hidden // heads)
    if head_dim % 2:  # rotary pairs (and llama.cpp's q/k row interleave) need an even head
        raise BadValue(f"the head size {head_dim} ({arch}.attention.key_length or embedding_length / "
                       "head_count) is odd")
    return hidden, heads, kv, head_dim


def _base_config(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    hidden, heads, kv, head_dim = _heads(meta, arch)
    rot = meta_int(meta, f"{arch}.rope.dimension_count", head_dim)
    if rot > head_dim or rot % 2:
        raise BadValue(f"{arch}.rope.dimension_count {rot} is not an even number of at most the "
                        f"head size {head_dim}")
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": meta_int(meta, f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta_int(meta, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta_float(meta, f"{arch}.rope.freq_base", 10000.0, positive=True),
        "max_position_embeddings": meta_int(meta, f"{arch}.context_length", 4096),
        "partial_rotary_factor": rot / head_dim,
    }
    scaling = _rope_scaling(meta, arch, cfg["max_position_embeddings"])
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    window = meta_int(meta, f"{arch}.attention.sliding_window", 0, low=0)
    if window:
        cfg["sliding_window"] = window
    return cfg


def _rope_scaling(meta: dict[str, Any], arch: str, max_pos: int) -> dict[str, Any] | None:
    """`{arch}.rope.scaling.*` as a config.json rope_scaling dict (Llama 3's scaling is a tensor,
    rope_freqs, read in gguf_config; Phi-3's LongRoPE in _phi3_config)."""
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.rope.scaling.{key}", default)

    def number(key: str, default: Any = None) -> float:
        return meta_float(meta, f"{arch}.rope.scaling.{key}", default, positive=True)

    kind = get("type", "none")
    if not isinstance(kind, str):
        raise BadValue(f"{arch}.rope.scaling.type is {describe(kind)}, not a string")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": number("factor", 1.0)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": number("factor", 1.0),
               "original_max_position_embeddings": meta_int(
                   meta, f"{arch}.rope.scaling.original_context_length", max_pos)}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if get(key) is not None:
                out[name] = number(key)
        if get("yarn_attn_factor") is not None:  # llama.cpp multiplies YaRN's own mscale by it
            out["attention_factor"] = number("yarn_attn_factor") * yarn_mscale(out["factor"])
        return out
    raise _Unsupported(f"{arch}.rope.scaling.type is {kind[:40]!r}; supported: none, linear, yarn")


def _llama_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp writes Mistral and Mixtral as "llama": a sliding window (in _base_config) and
    expert counts tell them apart."""
    experts = meta_int(meta, "llama.expert_count", 0, low=0)
    if experts:
        used = meta_int(meta, "llama.expert_used_count", 2)
        if used > experts:
            raise BadValue(f"llama.expert_used_count {used} is more than llama.expert_count {experts}")
        return {**cfg, "model_type": "mixtral", "hidden_act": "silu", "num_local_experts": experts,
                "num_experts_per_tok": used}
    return {**cfg, "model_type": "llama", "hidden_act": "silu"}


def _qwen2_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "model_type": "qwen2", "hidden_act": "silu", "attention_bias": True}


def _qwen3_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "model_type": "qwen3", "hidden_act": "silu"}


def _gemma3_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    # llama.cpp: the 27B (62 layers) scales queries by hidden/heads, the others by head_dim
    scalar = cfg["hidden_size"] // heads if n == 62 else cfg["head_dim"]
    return {
        **cfg,
        "model_type": "gemma3_text",
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "sliding_window": cfg.get("sliding_window", 4096),
        "layer_types": gemma3_layer_types(n),  # not stored in GGUF; Gemma 3 is always 5:1
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
    }


def _gemma_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "model_type": "gemma", "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True}


def _gemma2_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    # llama.cpp: the 27B (46 layers) scales queries by hidden/heads, the others by head_dim
    scalar = cfg["hidden_size"] // heads if n == 46 else cfg["head_dim"]
    caps = {k: meta_float(meta, f"gemma2.{k}", positive=True)
            for k in ("attn_logit_softcapping", "final_logit_softcapping") if meta.get(f"gemma2.{k}") is not None}
    return {**cfg, **caps, "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
            "tie_word_embeddings": True, "sliding_window": cfg.get("sliding_window", 4096),
            "query_pre_attn_scalar": scalar}  # even layers slide (Gemma2ForCausalLM's default)


def _starcoder2_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    eps = meta_float(meta, "starcoder2.attention.layer_norm_epsilon", 1e-5)
    return {**cfg, "model_type": "starcoder2", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": eps,
            "use_bias": True}


def _phi2_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "model_type": "phi", "hidden_act": "gelu_new", "attention_bias": True,
            "layer_norm_eps": meta_float(meta, "phi2.attention.layer_norm_epsilon", 1e-5)}


def _phi3_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE files carry an attention factor; the per-frequency factors are tensors, which
    `_phi3_rope_factors` moves into rope_scaling as they are read."""
    out = {**cfg, "model_type": "phi3", "hidden_act": "silu"}
    if meta.get("phi3.rope.scaling.attn_factor") is not None:
        orig = meta_int(meta, "phi3.rope.scaling.original_context_length", cfg["max_position_embeddings"])
        out["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": orig,
                               "attention_factor": meta_float(meta, "phi3.rope.scaling.attn_factor",
                                                              positive=True)}
    return out


CONFIGS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    # gguf general.architecture -> config builder
    "llama": _llama_config, "gemma3": _gemma3_config, "qwen2": _qwen2_config, "qwen3": _qwen3_config,
    "gemma": _gemma_config, "gemma2": _gemma2_config, "starcoder2": _starcoder2_config,
    "phi2": _phi2_config, "phi3": _phi3_config,
}


def gguf_config(gf: GGUFFile) -> ModelConfig:
    """The model's config from the file's metadata, every value checked for its type and range
    and against the other values and the tensors' shapes before anything is sized from it."""
    arch = gf.architecture
    if arch not in CONFIGS:
        raise UserError(f"{gf.path}: architecture {arch[:80]!r} is not supported; supported GGUF "
                        f"architectures: {', '.join(sorted(CONFIGS))}.")
    embd = gf.tensors.get("token_embd.weight")
    if embd is None:
        raise UserError(f"{gf.path}: it lacks the tensor token_embd.weight (the token embeddings); the "
                        "file is incomplete or was written by a broken converter.")
    try:
        base = _base_config(gf.metadata, arch)
        check_blocks(gf, base["num_hidden_layers"])  # before a builder sizes a list by it (Gemma 3)
        cfg = CONFIGS[arch](gf.metadata, base)
        cfg["vocab_size"] = meta_int(gf.metadata, f"{arch}.vocab_size", embd.shape[0])
    except MissingKey as e:
        raise UserError(f"{gf.path}: GGUF metadata lacks the required key {e.args[0]}; the file "
                        "is incomplete or was written by a broken converter.") from None
    except _Unsupported as e:
        raise UserError(f"{gf.path}: {e.args[0]}.") from None
    except BadValue as e:
        raise UserError(f"{gf.path}: GGUF metadata {e.args[0]}; the file is damaged or was written "
                        "by a broken converter.") from None
    check_tensors(gf, cfg)
    if "rope_freqs.weight" in gf.tensors:  # Llama 3.x: per-frequency divisors, precomputed
        from gguf.quants import dequantize

        factors = dequantize(gf.raw_np("rope_freqs.weight"), gf.tensors["rope_freqs.weight"].qtype)
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.flatten().tolist()}
    return ModelConfig.from_dict(cfg)
