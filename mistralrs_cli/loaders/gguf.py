"""GGUF -> ModelConfig + a model with HF module names, quantized weights kept as blocks.

Everything format-specific is a table here: metadata keys -> config fields, GGUF tensor names ->
HF names, and per-architecture weight fix-ups (llama.cpp's q/k row permutation, Gemma's norm + 1).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backends.torch_backend import TorchBackend
from ..errors import UserError
from ..models import ARCHITECTURES
from ..models.config import ModelConfig
from ..quant.dequant import SUPPORTED as DEQUANT_SUPPORTED
from ..quant.qweight import QWeight
from .gguf_config import (_gemma2_config, _gemma3_config, _gemma_config, _llama_config, _phi2_config,  # noqa: F401
                          _phi3_config, _qwen2_config, _qwen3_config, _starcoder2_config, gguf_config)
from .gguf_file import GGUFFile
from .weights import build_model, fuse_projections

# GGUF block-tensor name -> HF name (per-layer names use {i}); architectures override entries
TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    # mixture of experts: a router, and experts stacked in one 3-D tensor per projection ({e})
    "blk.{i}.ffn_gate_inp": "model.layers.{i}.block_sparse_moe.gate",
    "blk.{i}.ffn_gate_exps": "model.layers.{i}.block_sparse_moe.experts.{e}.w1",
    "blk.{i}.ffn_down_exps": "model.layers.{i}.block_sparse_moe.experts.{e}.w2",
    "blk.{i}.ffn_up_exps": "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
    # older converters: one 2-D tensor per expert (blk.N.ffn_gate.E.weight)
    "blk.{i}.ffn_gate.{e}": "model.layers.{i}.block_sparse_moe.experts.{e}.w1",
    "blk.{i}.ffn_down.{e}": "model.layers.{i}.block_sparse_moe.experts.{e}.w2",
    "blk.{i}.ffn_up.{e}": "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
}
_GEMMA_NAMES = {"blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm"}
# starcoder2's non-gated MLP: c_fc (up) -> c_proj (down)
_STARCODER2_NAMES = {"blk.{i}.ffn_up": "model.layers.{i}.mlp.c_fc",
                     "blk.{i}.ffn_down": "model.layers.{i}.mlp.c_proj"}


def _phi3_rope_factors(cfg: ModelConfig, name: str, w: QWeight) -> QWeight:
    if name in ("rope_factors_long", "rope_factors_short") and cfg.rope_scaling is not None:
        cfg.rope_scaling[name.replace("rope_factors_", "") + "_factor"] = w.dequantize().flatten().tolist()
    return w


_PHI2_NAMES = {"output_norm": "model.final_layernorm",
               "blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",  # split at load
               "blk.{i}.attn_output": "model.layers.{i}.self_attn.dense",
               "blk.{i}.ffn_up": "model.layers.{i}.mlp.fc1",
               "blk.{i}.ffn_down": "model.layers.{i}.mlp.fc2"}
# Phi-3 keeps HF's fused projections: attn_qkv is q|k|v rows, ffn_up is gate|up rows
_PHI3_NAMES = {"blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",
               "blk.{i}.ffn_up": "model.layers.{i}.mlp.gate_up_proj",
               "rope_factors_long": "rope_factors_long", "rope_factors_short": "rope_factors_short"}


def _unpermute_qk(cfg: ModelConfig, name: str, w: QWeight) -> QWeight:
    """llama.cpp's converter interleaves q/k rows for its rope; undo it (rows = whole blocks)."""
    if not name.endswith(("q_proj", "k_proj")):
        return w
    heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
    half = w.shape[0] // heads // 2
    # row (h, i, j) of the file -> row (h, j, i): whole rows of blocks gathered (a strided byte
    # copy of the same permutation is ~10x slower)
    order = torch.arange(w.shape[0]).view(heads, half, 2).transpose(1, 2).reshape(-1)
    return QWeight(w.raw.index_select(0, order), w.qtype, w.shape)


def _gemma_norm(cfg: ModelConfig, name: str, w: QWeight) -> QWeight:
    """llama.cpp stores Gemma norms as (1 + w); our models use HF's w with a +1 offset."""
    if not name.endswith("norm"):
        return w
    return QWeight.from_float(w.dequantize() - 1.0, w.shape)


def _split_qkv(cfg: ModelConfig, target: str, w: QWeight) -> list[tuple[str, QWeight]]:
    """A fused attn_qkv (q, k, v rows in turn) as q_proj, k_proj, v_proj: for models whose
    attention has separate projections (Phi-2 files converted from its Wqkv checkpoints)."""
    if ".qkv_proj." not in target:
        return [(target, w)]
    hd = cfg.head_dim
    sizes = [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd]
    names = [target.replace(".qkv_proj.", f".{x}_proj.") for x in "qkv"]
    if w.shape[0] == 1:  # the bias: a (1, n) vector
        parts = w.dequantize().flatten().split(sizes)
        return [(n, QWeight.from_float(p, (1, p.numel()))) for n, p in zip(names, parts)]
    rows = w.raw.split(sizes)  # whole rows of blocks
    return [(n, QWeight(r, w.qtype, (r.shape[0], w.shape[1]))) for n, r in zip(names, rows)]


def _as_is(cfg: ModelConfig, name: str, w: QWeight) -> QWeight:
    return w


ARCHS: dict[str, tuple[Callable, dict[str, str], Callable]] = {
    # gguf general.architecture -> (config builder, tensor-name overrides, weight fix-up)
    "llama": (_llama_config, {}, _unpermute_qk),
    "gemma3": (_gemma3_config, _GEMMA_NAMES, _gemma_norm),
    # NEOX rope in llama.cpp: its converter leaves q/k rows in HF order
    "qwen2": (_qwen2_config, {}, _as_is),
    "qwen3": (_qwen3_config, {}, _as_is),
    # gemma, gemma2, starcoder2: NEOX rope too, q/k rows in HF order
    "gemma": (_gemma_config, {}, _gemma_norm),
    "gemma2": (_gemma2_config, _GEMMA_NAMES, _gemma_norm),
    "starcoder2": (_starcoder2_config, _STARCODER2_NAMES, _as_is),
    "phi2": (_phi2_config, _PHI2_NAMES, _as_is),
    "phi3": (_phi3_config, _PHI3_NAMES, _phi3_rope_factors),
}


SPLIT_QKV = {"phi2"}  # architectures whose fused attn_qkv becomes q/k/v_proj


def hf_name(gguf_name: str, table: dict[str, str]) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) >= 3:
        e = parts.pop() if len(parts) == 4 and parts[3].isdigit() else None  # per-expert tensor
        key, i = "blk.{i}." + ".".join(parts[2:]) + (".{e}" if e is not None else ""), parts[1]
        target = table.get(key)
        if target is None:
            return None
        target = target.replace("{i}", i)
        return (target if e is None else target.replace("{e}", e)) + "." + suffix
    target = table.get(base)
    return None if target is None else target + "." + suffix


def _weights_of(target: str, raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> list[tuple[str, QWeight]]:
    """One tensor's weights: (1, n) for a vector, (rows, cols) for a matrix, and for experts stacked
    in a 3-D tensor (experts, rows, cols) one weight per expert (its rows are whole blocks)."""
    if len(shape) == 1:
        return [(target, QWeight(raw, qtype, (1, shape[0])))]
    if len(shape) == 2:
        return [(target, QWeight(raw, qtype, (shape[0], shape[1])))]
    experts = raw.view(shape[0], shape[1], -1)  # (E, rows, row_bytes)
    return [(target.replace("{e}", str(e)), QWeight(experts[e], qtype, (shape[1], shape[2])))
            for e in range(shape[0])]


def load_gguf_model(gf: GGUFFile, numerics: str = "precise") -> tuple[torch.nn.Module, ModelConfig]:
    """numerics: "precise", "fast" (8-bit activation blocks, f16 KV cache) or "exact" (see
    backends/torch_backend.py)."""
    cfg = gguf_config(gf)
    _, overrides, fixup = ARCHS[gf.architecture]
    table = {**TENSOR_NAMES, **overrides}
    weights: dict[str, QWeight] = {}
    for name, info in gf.tensors.items():
        target = hf_name(name, table)
        if target is None:
            continue  # tensors we do not use (e.g. rope_freqs precomputed by some converters)
        if info.qtype not in DEQUANT_SUPPORTED:
            raise UserError(f"{gf.path}: tensor {name} has type {info.qtype.name}, which is not "
                            "supported yet; use a file quantized with another type.")
        for hf, w in _weights_of(target, gf.raw(name), info.qtype, info.shape):
            for hf_part, part in (_split_qkv(cfg, hf, w) if gf.architecture in SPLIT_QKV else [(hf, w)]):
                weights[hf_part] = fixup(cfg, hf_part.rsplit(".", 1)[0], part)
    backend = TorchBackend(numerics)
    model = build_model(ARCHITECTURES[cfg.model_type], cfg, weights, source=str(gf.path), backend=backend)
    fuse_projections(model, backend.can_fuse)
    model.kv_dtype = torch.float16 if numerics == "fast" else torch.float32
    return model, cfg
