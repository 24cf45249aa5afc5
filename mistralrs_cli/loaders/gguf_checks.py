"""A GGUF file's tensors checked against the config its metadata gives, before anything is sized
from either: the embeddings' shape, one set of tensors per block and none past block_count, the
projections' shapes (the heads times the head size, the feed-forward size) and the rotary factor
tables' lengths. llama.cpp refuses the same files (its create_tensor checks every shape).

A file that passes cannot make a loader allocate more than its tensors' bytes (which fit in the
file, gguf_file.py checks) or loop over layers it does not have.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from ..errors import UserError
from .gguf_file import GGUFFile

_BLOCK = re.compile(r"blk\.(\d+)\.")
_SHAPED = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_qkv|attn_output|ffn_gate|ffn_down"
                     r"|ffn_gate_exps|ffn_up_exps|ffn_down_exps)\.weight")


def _fail(gf: GGUFFile, what: str) -> None:
    raise UserError(f"{gf.path}: {what}; the file is damaged or was written by a broken converter.")


def check_tensors(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    """cfg: the config dict gguf_config builds (its values already in range)."""
    _check_embedding(gf, cfg)
    check_blocks(gf, cfg["num_hidden_layers"])
    _check_shapes(gf, cfg)
    _check_rope_factors(gf, cfg)


def _check_embedding(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    arch, hidden, vocab = gf.architecture, cfg["hidden_size"], cfg["vocab_size"]
    embd = gf.tensors.get("token_embd.weight")
    if embd is None:
        _fail(gf, "it lacks the tensor token_embd.weight (the token embeddings)")
    if embd.shape != (vocab, hidden):
        _fail(gf, f"tensor token_embd.weight has shape {list(embd.shape)} but the metadata gives "
                  f"[{vocab}, {hidden}] ({arch}.vocab_size or its rows, {arch}.embedding_length)")
    out = gf.tensors.get("output.weight")
    if out is not None and out.shape != (vocab, hidden):
        _fail(gf, f"tensor output.weight has shape {list(out.shape)} but token_embd.weight has "
                  f"{list(embd.shape)}")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, Sequence) and not isinstance(tokens, str) and len(tokens) != vocab:
        _fail(gf, f"tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight has "
                  f"{vocab} rows, one per token")


def check_blocks(gf: GGUFFile, n: int) -> None:
    """Blocks 0..n-1 each have tensors and none has a higher number; the search stops at the
    first gap, so a block_count of 10**9 costs no more than the tensors present."""
    key = f"{gf.architecture}.block_count"
    present = {int(m.group(1)) for name in gf.tensors if (m := _BLOCK.match(name))}
    if present and max(present) >= n:
        _fail(gf, f"{key} is {n} but the file has tensors for block {max(present)}")
    missing = next((i for i in range(n) if i not in present), None)
    if missing is not None:
        _fail(gf, f"{key} is {n} but the file has no tensors for block {missing}")


def _check_shapes(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    d, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    experts = cfg.get("num_local_experts", 0)
    want = {"attn_q": (q, d), "attn_k": (kv, d), "attn_qkv": (q + 2 * kv, d), "attn_output": (d, q),
            "ffn_gate": (inter, d), "ffn_down": (d, inter), "ffn_gate_exps": (experts, inter, d),
            "ffn_up_exps": (experts, inter, d), "ffn_down_exps": (experts, d, inter)}
    heads = f"{cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} KV heads of {hd}"
    for name, info in gf.tensors.items():
        m = _SHAPED.fullmatch(name)
        if m is not None and tuple(info.shape) != want[m.group(1)]:
            _fail(gf, f"tensor {name} has shape {list(info.shape)} but the metadata ({heads}, "
                      f"embedding_length {d}, feed_forward_length {inter}) gives "
                      f"{list(want[m.group(1)])}")


def _check_rope_factors(gf: GGUFFile, cfg: dict[str, Any]) -> None:
    rot = round(cfg["head_dim"] * cfg["partial_rotary_factor"])
    for name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
        info = gf.tensors.get(name)
        if info is not None and math.prod(info.shape) != rot // 2:
            _fail(gf, f"tensor {name} has {math.prod(info.shape)} values but the rotary dimension "
                      f"{rot} needs {rot // 2}, one per frequency")
