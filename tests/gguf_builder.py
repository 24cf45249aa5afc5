"""Tiny GGUF files built from transformers models, written the way llama.cpp's converter writes them.

A test builds a seeded random transformers model and a tiny byte-level BPE vocab (tiny_models.py,
re-exported here for the tests that import one module), and writes both with `write_gguf`: arch metadata keys, GGUF tensor
names, llama's q/k row permutation, Gemma's norms stored as (1 + w), F32 or Q8_0 tensors, and the
gpt2 tokenizer keys. `write_gguf` also takes an arbitrary `general.architecture` and per-tensor
GGML types (random bytes for types gguf-py cannot quantize), for bad-input tests.

Nothing here is read by the package: it is the independent writer our loader is tested against.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from tokenizers import Tokenizer as HFTokenizer

from tiny_models import (BOS, EOS, VOCAB, tiny_gemma, tiny_gemma2, tiny_gemma3, tiny_llama,  # noqa: F401
                         tiny_mistral, tiny_mixtral, tiny_phi2, tiny_phi3, tiny_qwen2, tiny_qwen3,
                         tiny_starcoder2, train_tokenizer, training_corpus)

_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3


@dataclass
class GGUFVocab:
    """The gpt2 tokenizer keys of a GGUF file."""
    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right", rank order
    bos_id: int
    eos_id: int


def gguf_vocab(tok: HFTokenizer) -> GGUFVocab:
    spec = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = spec["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    types = [_TOKEN_CONTROL if t in (BOS, EOS) else _TOKEN_NORMAL for t in tokens]
    return GGUFVocab(tokens, types, merges, vocab[BOS], vocab[EOS])


# ---- HF -> GGUF: names, metadata, weight transforms ----
_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# transformers 5 keeps a Mixtral block's experts stacked, gate and up fused: `_mixtral_split`
# names the parts, which llama.cpp writes as three 3-D tensors (experts first)
_MIXTRAL_TENSORS = {**_TENSORS, "mlp.gate": "ffn_gate_inp", "mlp.experts.gate": "ffn_gate_exps",
                    "mlp.experts.up": "ffn_up_exps", "mlp.experts.down": "ffn_down_exps"}
_STARCODER2_TENSORS = {**_TENSORS, "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_GEMMA_TENSORS = {**_TENSORS, "post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str, table: dict[str, str]) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        i, rest = module[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{table[rest]}.{suffix}"
    return f"{table[module]}.{suffix}"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows (2, half) -> (half, 2), i.e. rotate-half pairs
    become adjacent pairs for ggml's interleaved rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_weight(cfg: Any, hf_name: str, w: np.ndarray) -> np.ndarray:
    if hf_name.endswith("q_proj.weight"):
        return permute_qk(w, cfg.num_attention_heads)
    if hf_name.endswith("k_proj.weight"):
        return permute_qk(w, cfg.num_key_value_heads)
    return w


def _as_is(cfg: Any, hf_name: str, w: np.ndarray) -> np.ndarray:
    return w  # qwen2/qwen3: NEOX rope in llama.cpp, q/k rows stay in HF order


def _mixtral_split(cfg: Any, hf_name: str, w: np.ndarray) -> dict[str, np.ndarray]:
    if hf_name.endswith("experts.gate_up_proj"):  # (E, 2 I, H): gate rows, then up rows
        base, n = hf_name[: -len("gate_up_proj")], cfg.intermediate_size
        return {base + "gate.weight": w[:, :n], base + "up.weight": w[:, n:]}
    if hf_name.endswith("experts.down_proj"):
        return {hf_name[: -len("down_proj")] + "down.weight": w}
    return {hf_name: w}


def _gemma_weight(cfg: Any, hf_name: str, w: np.ndarray) -> np.ndarray:
    return w + 1.0 if hf_name.endswith("norm.weight") else w


def _common_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def _llama_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _common_kv(w, cfg)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    _rope_scaling_kv(w, cfg)


def _rope_scaling_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    """Linear and YaRN scaling as llama.cpp's converter writes them (Llama 3's: rope_freqs)."""
    rope = cfg.rope_parameters
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, name in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if key in rope:
                w.add_float32(f"{w.arch}.rope.scaling.{name}", float(rope[key]))


def llama3_rope_freqs(cfg: Any) -> np.ndarray | None:
    """Llama 3's scaling as the divisor per frequency that llama.cpp's converter precomputes:
    1 for short wavelengths, `factor` for long ones, the smooth blend's inverse between."""
    rope = cfg.rope_parameters
    if rope.get("rope_type") != "llama3":
        return None
    dim = cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blend = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, blend))
    return out.astype(np.float32)


def _mistral_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _llama_kv(w, cfg)
    w.add_sliding_window(cfg.sliding_window)


def _mixtral_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _llama_kv(w, cfg)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)


def _qwen_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _common_kv(w, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])


def _gemma3_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _gemma_kv(w, cfg)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)


def _gemma_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _common_kv(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


def _gemma2_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _gemma_kv(w, cfg)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(cfg.sliding_window)


def _starcoder2_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_eps(cfg.norm_epsilon)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)


@dataclass(frozen=True)
class ArchWriter:
    gguf_arch: str
    names: dict[str, str]
    weight: Callable[[Any, str, np.ndarray], np.ndarray]
    kv: Callable[[gguf.GGUFWriter, Any], None]
    # one HF tensor -> the HF-named parts llama.cpp writes separately (default: itself)
    split: Callable[[Any, str, np.ndarray], dict[str, np.ndarray]] = lambda cfg, name, w: {name: w}


ARCHS: dict[str, ArchWriter] = {  # transformers model_type -> how llama.cpp converts it
    "llama": ArchWriter("llama", _TENSORS, _llama_weight, _llama_kv),
    "gemma3_text": ArchWriter("gemma3", _GEMMA_TENSORS, _gemma_weight, _gemma3_kv),
    "mistral": ArchWriter("llama", _TENSORS, _llama_weight, _mistral_kv),
    "mixtral": ArchWriter("llama", _MIXTRAL_TENSORS, _llama_weight, _mixtral_kv, _mixtral_split),
    "qwen2": ArchWriter("qwen2", _TENSORS, _as_is, _qwen_kv),
    "qwen3": ArchWriter("qwen3", _TENSORS, _as_is, _qwen_kv),
    "gemma": ArchWriter("gemma", _TENSORS, _gemma_weight, _gemma_kv),
    "gemma2": ArchWriter("gemma2", _GEMMA_TENSORS, _gemma_weight, _gemma2_kv),
    "starcoder2": ArchWriter("starcoder2", _STARCODER2_TENSORS, _as_is, _starcoder2_kv),
}


def gguf_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, converted as llama.cpp does (tied lm_head left out)."""
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    out = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        for name, w in arch.split(cfg, hf_name, t.detach().float().numpy().copy()).items():
            out[gguf_name(name, arch.names)] = arch.weight(cfg, name, w).astype(np.float32)
    freqs = llama3_rope_freqs(cfg) if cfg.model_type == "llama" else None
    if freqs is not None:
        out["rope_freqs.weight"] = freqs
    return out


def _split_experts(name: str, w: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """blk.N.ffn_gate_exps.weight (E, rows, cols) -> blk.N.ffn_gate.{e}.weight, one per expert."""
    base, _, suffix = name.rpartition(".")
    if not base.endswith("_exps"):
        return [(name, w)]
    return [(f"{base[:-len('_exps')]}.{e}.{suffix}", w[e]) for e in range(w.shape[0])]


def _fuse_qkv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, w in tensors.items():
        if ".attn_k." in name or ".attn_v." in name:
            continue
        if ".attn_q." in name:
            parts = [tensors[name.replace(".attn_q.", f".attn_{x}.")] for x in "qkv"]
            name, w = name.replace(".attn_q.", ".attn_qkv."), np.concatenate(parts, axis=0)
        out[name] = w
    return out


# fp16 scale fields of the K types (byte offsets in a block): kept small and finite
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,),
             Q.IQ4_XS: (0,)}


def random_blocks(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random bytes laid out as (rows, row_bytes) of `qtype` blocks: any type, even ones
    gguf-py cannot quantize. K types get scales in [0.001, 0.003) so the weights decode to
    sane values (a model built from them gives finite logits)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values are not whole {qtype.name} blocks of {block}")
    rows = int(np.prod(shape[:-1]))
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (rows, shape[-1] // block * size), dtype=np.uint8)
    blocks = out.reshape(-1, size)
    for off in _K_SCALES.get(qtype, ()):
        d = rng.uniform(0.001, 0.003, blocks.shape[0]).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return out


# what gguf.quants.quantize can write; any other type gets random block bytes
QUANTIZABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})


def _file_type(qtype: Q) -> gguf.LlamaFileType:
    if qtype == Q.F32:
        return gguf.LlamaFileType.ALL_F32
    return getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", gguf.LlamaFileType.GUESSED)


def _encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """F32 for 1-D tensors and rows that are not whole blocks (llama.cpp's fallback)."""
    if qtype == Q.F32 or w.ndim < 2 or w.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return w, Q.F32
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(path: str | Path, model: torch.nn.Module, vocab: GGUFVocab | None, qtype: Q = Q.F32,
               architecture: str | None = None, chat_template: str | None = None,
               tensor_types: dict[str, Q] | None = None, add_bos: bool = True,
               extra_strings: dict[str, str] | None = None, per_expert: bool = False,
               fused_qkv: bool = False) -> Path:
    """Write `model` (and `vocab`) as llama.cpp's converter would; returns the path.

    architecture: written as general.architecture and the metadata key prefix (default: the
    model's llama.cpp name). tensor_types: GGUF tensor name -> GGML type, overriding `qtype`;
    types gguf-py cannot quantize get random block bytes. extra_strings: more string keys.
    per_expert: MoE experts one 2-D tensor each (`ffn_gate.{e}`), as converters wrote them before
    llama.cpp stacked them into `ffn_gate_exps`. fused_qkv: attn_q/k/v as one attn_qkv (q, k, v
    rows in turn), as Phi-2 GGUFs converted from its original Wqkv checkpoints have them."""
    path = Path(path)
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), architecture or arch.gguf_arch)
    writer.add_name(f"tiny-{arch.gguf_arch}")
    arch.kv(writer, cfg)
    writer.add_file_type(_file_type(qtype))
    if vocab is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (extra_strings or {}).items():
        writer.add_string(key, value)
    tensors = gguf_tensors(model)
    if per_expert:
        tensors = dict(kv for name, w in tensors.items() for kv in _split_experts(name, w))
    if fused_qkv:
        tensors = _fuse_qkv(tensors)
    for name, w in tensors.items():
        want = (tensor_types or {}).get(name, qtype)
        if want in QUANTIZABLE:
            data, got = _encode(w, want)
        else:
            data, got = random_blocks(w.shape, want), want
        # uint8 data: gguf-py derives the logical shape from the byte shape and the type
        writer.add_tensor(name, data, raw_dtype=None if got == Q.F32 else got)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- phi2 and phi3 (llama.cpp's Phi2Model and Phi3MiniModel converters) ----
_PHI2_TENSORS = {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm",
                 "lm_head": "output", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_PHI3_TENSORS = {**_TENSORS, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
                 "rope_factors_long": "rope_factors_long", "rope_factors_short": "rope_factors_short"}


def _rope_dims(cfg: Any) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))


def _phi2_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_rope_dimension_count(_rope_dims(cfg))


def _phi3_longrope(cfg: Any) -> tuple[int, float] | None:
    """(original context, attention factor) as the converter computes them, or None."""
    rope = cfg.rope_parameters
    if rope.get("rope_type") not in ("longrope", "su"):
        return None
    orig = rope.get("original_max_position_embeddings") or cfg.original_max_position_embeddings
    scale = cfg.max_position_embeddings / orig
    return orig, (float(np.sqrt(1 + np.log(scale) / np.log(orig))) if scale > 1.0 else 1.0)


def _phi3_kv(w: gguf.GGUFWriter, cfg: Any) -> None:
    _common_kv(w, cfg)
    w.add_rope_dimension_count(_rope_dims(cfg))
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_scaling_orig_ctx_len(getattr(cfg, "original_max_position_embeddings", cfg.max_position_embeddings))
    longrope = _phi3_longrope(cfg)
    if longrope is not None:
        w.add_rope_scaling_attn_factors(longrope[1])


def _phi3_split(cfg: Any, hf_name: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """The converter adds the LongRoPE factors as two F32 tensors; they ride along here with
    the embedding, the one tensor every model has."""
    if hf_name != "model.embed_tokens.weight" or _phi3_longrope(cfg) is None:
        return {hf_name: w}
    rope = cfg.rope_parameters
    return {hf_name: w, "rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32)}


ARCHS["phi"] = ArchWriter("phi2", _PHI2_TENSORS, _as_is, _phi2_kv)
ARCHS["phi3"] = ArchWriter("phi3", _PHI3_TENSORS, _as_is, _phi3_kv, _phi3_split)
