"""`ggml`: llama models in the GGML v3 'ggjt' format llama.cpp used before GGUF.

The file holds seven u32 hyper-parameters, a vocab with scores (no merges, so the tokenizer must
come from -t/--tokenizer-json) and tensors under Meta's llama names, memory-mapped here. What the
file does not say is passed on the command line: --gqa (KV heads = heads / gqa), --eps and
--rope-theta. q/k rows are stored interleaved for ggml's rope, exactly as in llama GGUF files, so
the GGUF loader's un-permutation applies unchanged.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import hub
from ..backends.torch_backend import TorchBackend
from ..errors import UserError
from ..models import ARCHITECTURES
from ..models.config import ModelConfig
from ..quant.dequant import SUPPORTED as DEQUANT_SUPPORTED
from ..quant.qweight import QWeight
from ..types import GGMLSpec, LoadOptions
from .gguf import _unpermute_qk
from .weights import build_model, fuse_projections, prepare_weights, set_dtype

GGJT_MAGIC = 0x67676A74  # 'ggjt' as a little-endian u32
GGJT_VERSION = 3
ALIGNMENT = 32
HPARAMS = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
DEFAULT_CONTEXT = 2048  # llama.cpp's default n_ctx for GGML models: the file does not say

# Meta's llama tensor names -> HF names ({i}: the layer)
TENSOR_NAMES: dict[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "layers.{i}.attention.wq": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.attention.wk": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.attention.wv": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.attention.wo": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.attention_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.feed_forward.w1": "model.layers.{i}.mlp.gate_proj",
    "layers.{i}.feed_forward.w2": "model.layers.{i}.mlp.down_proj",
    "layers.{i}.feed_forward.w3": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
}


class _Truncated(Exception):
    pass


@dataclass
class GGMLTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: the file's ne reversed
    offset: int
    nbytes: int


class GGMLFile:
    """hparams (dict), vocab [(bytes, score)] and memory-mapped tensors of a ggjt v3 file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"GGML file {self.path} does not exist; check the -m/-f paths.") from None
        if size < 8:
            raise UserError(f"{self.path} is not a GGML 'ggjt' file (only {size} bytes); pass a "
                            "GGML v3 .bin model file.")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        magic, version = struct.unpack_from("<II", self._map, 0)
        if magic != GGJT_MAGIC:
            hint = " (it is a GGUF file: use the gguf subcommand)" if bytes(self._map[:4]) == b"GGUF" else ""
            raise UserError(f"{self.path} is not a GGML 'ggjt' file (wrong magic 0x{magic:08x}){hint}; "
                            "pass a GGML v3 .bin model file.")
        if version != GGJT_VERSION:
            raise UserError(f"{self.path} is GGML 'ggjt' version {version}; only version 3 is "
                            "supported (convert older files with llama.cpp first).")
        try:
            self._parse(memoryview(self._map))
        except _Truncated:
            raise UserError(f"{self.path} is truncated: it ends inside its header or a tensor; "
                            "re-download or re-convert the file.") from None

    def _take(self, buf: memoryview, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self._pos + size > len(buf):
            raise _Truncated()
        out = struct.unpack_from(fmt, buf, self._pos)
        self._pos += size
        return out

    def _bytes(self, buf: memoryview, n: int) -> bytes:
        if self._pos + n > len(buf):
            raise _Truncated()
        out = bytes(buf[self._pos:self._pos + n])
        self._pos += n
        return out

    def _parse(self, buf: memoryview) -> None:
        self._pos = 8
        self.hparams: dict[str, int] = dict(zip(HPARAMS, self._take(buf, "<7I")))
        self.vocab: list[tuple[bytes, float]] = []
        for _ in range(self.hparams["n_vocab"]):
            (n,) = self._take(buf, "<I")
            text = self._bytes(buf, n)
            self.vocab.append((text, self._take(buf, "<f")[0]))
        self.tensors: dict[str, GGMLTensor] = {}
        while self._pos < len(buf):
            n_dims, name_len, ttype = self._take(buf, "<III")
            if not 1 <= n_dims <= 4:
                raise UserError(f"{self.path} has a malformed tensor header ({n_dims} dimensions at "
                                f"byte {self._pos - 12}); the file is damaged.")
            ne = self._take(buf, f"<{n_dims}I")
            name = self._bytes(buf, name_len).decode("utf-8", errors="replace")
            if len(name) >= 64 or not name.isprintable():  # ggml's names: short C strings
                raise UserError(f"{self.path} has a damaged tensor name {name[:80]!r} at byte "
                                f"{self._pos - name_len}; the file is damaged.")
            try:
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise UserError(f"{self.path}: tensor {name} has unknown GGML type {ttype}; the file "
                                "is damaged or uses a type this build does not read.") from None
            if ne[0] % block or 0 in ne:
                raise UserError(f"{self.path}: tensor {name} has dimensions {list(ne)}, not whole "
                                f"{qtype.name} blocks of {block} per row; the file is damaged.")
            nbytes = math.prod(ne) // block * type_size  # Python ints: no int64 wrap-around
            offset = -(-self._pos // ALIGNMENT) * ALIGNMENT
            if offset + nbytes > len(buf):
                raise _Truncated()
            self.tensors[name] = GGMLTensor(name, qtype, tuple(reversed(ne)), offset, nbytes)
            self._pos = offset + nbytes

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as uint8 (rows, row_bytes), zero-copy from the file mapping."""
        info = self.tensors[name]
        data = self._map[info.offset:info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return torch.from_numpy(data).view(rows, info.nbytes // rows)

    def release(self) -> None:
        mm = getattr(self._map, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def hf_name(ggml_name: str) -> str | None:
    base, _, suffix = ggml_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "layers" and len(parts) >= 3:
        target = TENSOR_NAMES.get("layers.{i}." + ".".join(parts[2:]))
        return None if target is None else target.replace("{i}", parts[1]) + "." + suffix
    target = TENSOR_NAMES.get(base)
    return None if target is None else target + "." + suffix


def n_ff_from_mult(n_embd: int, n_mult: int) -> int:
    """llama.cpp's GGML-era rule: 2/3 of 4 * n_embd, rounded up to a multiple of n_mult."""
    n_ff = 2 * (4 * n_embd) // 3
    return -(-n_ff // n_mult) * n_mult


def ggml_config(gf: GGMLFile, gqa: int = 1, eps: float = 1e-5, rope_theta: float = 10000.0) -> ModelConfig:
    hp = gf.hparams
    heads, embd = hp["n_head"], hp["n_embd"]
    if heads <= 0 or embd <= 0 or embd % heads or hp["n_layer"] <= 0 or hp["n_vocab"] <= 0:
        raise UserError(f"{gf.path} has impossible hyper-parameters (n_embd {embd}, n_head {heads}, "
                        f"n_layer {hp['n_layer']}); the file is damaged.")
    if gqa < 1 or heads % gqa:
        raise UserError(f"--gqa {gqa} does not divide the model's {heads} attention heads; pass a "
                        "divisor of it (8 for LLaMA-2 70B, else 1).")
    w1 = gf.tensors.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and len(w1.shape) == 2:
        n_ff = w1.shape[0]
    elif hp["n_mult"] > 0:
        n_ff = n_ff_from_mult(embd, hp["n_mult"])
    else:
        raise UserError(f"{gf.path} has n_mult 0 and no feed-forward tensor; the file is damaged.")
    head_dim = embd // heads
    if hp["n_rot"] > head_dim or hp["n_rot"] % 2:
        raise UserError(f"{gf.path} has n_rot {hp['n_rot']}, not an even number of at most the head "
                        f"size {head_dim}; the file is damaged.")
    return ModelConfig.from_dict({
        "model_type": "llama", "hidden_act": "silu",
        "vocab_size": hp["n_vocab"], "hidden_size": embd, "intermediate_size": n_ff,
        "num_hidden_layers": hp["n_layer"], "num_attention_heads": heads,
        "num_key_value_heads": heads // gqa, "head_dim": head_dim,
        "rms_norm_eps": float(eps), "rope_theta": float(rope_theta),
        "max_position_embeddings": DEFAULT_CONTEXT,
        "partial_rotary_factor": (hp["n_rot"] or head_dim) / head_dim,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    })


def _check_layers(gf: GGMLFile, cfg: ModelConfig) -> None:
    """n_layer against the layers the file has tensors for, and the embeddings against n_embd,
    before a model of n_layer layers is built (a damaged n_layer would otherwise size it)."""
    n = cfg.num_hidden_layers
    present = {int(m.group(1)) for name in gf.tensors if (m := re.match(r"layers\.(\d+)\.", name))}
    missing = next((i for i in range(n) if i not in present), None)
    if missing is not None or (present and max(present) >= n):
        which = f"no tensors for layer {missing}" if missing is not None else f"tensors for layer {max(present)}"
        raise UserError(f"{gf.path} says n_layer {n} but has {which}; the file is damaged.")
    emb = gf.tensors.get("tok_embeddings.weight")
    if emb is None or len(emb.shape) != 2 or emb.shape[1] != cfg.hidden_size:
        shape = "no tok_embeddings.weight" if emb is None else f"tok_embeddings of shape {list(emb.shape)}"
        raise UserError(f"{gf.path} says n_embd {cfg.hidden_size} but has {shape}; the file is damaged.")


def _check_shapes(gf: GGMLFile, cfg: ModelConfig) -> None:
    """A wrong --gqa shows first as k/v rows: say so rather than a generic shape error."""
    _check_layers(gf, cfg)
    wk = gf.tensors.get("layers.0.attention.wk.weight")
    if wk is not None and len(wk.shape) == 2:
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        if wk.shape[0] != kv_rows:
            gqa = cfg.num_attention_heads * cfg.head_dim // max(wk.shape[0], 1)
            raise UserError(f"{gf.path}: the key projection has {wk.shape[0]} rows but --gqa gives "
                            f"{kv_rows}; pass --gqa {gqa} for this model.")
    emb = gf.tensors.get("tok_embeddings.weight")
    if emb is not None and emb.shape[0] != cfg.vocab_size:
        raise UserError(f"{gf.path}: tok_embeddings has {emb.shape[0]} rows but the header says "
                        f"n_vocab {cfg.vocab_size}; the file is damaged.")


def load_ggml_model(gf: GGMLFile, gqa: int = 1, eps: float = 1e-5, rope_theta: float = 10000.0,
                    numerics: str = "precise") -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ggml_config(gf, gqa, eps, rope_theta)
    _check_shapes(gf, cfg)
    weights: dict[str, QWeight] = {}
    for name, info in gf.tensors.items():
        target = hf_name(name)
        if target is None:
            continue
        if info.qtype not in DEQUANT_SUPPORTED:
            raise UserError(f"{gf.path}: tensor {name} has type {info.qtype.name}, which is not "
                            "supported yet; use a file quantized with another type.")
        if len(info.shape) == 1:
            w = QWeight(gf.raw(name), info.qtype, (1, info.shape[0]))
        elif len(info.shape) == 2:
            w = QWeight(gf.raw(name), info.qtype, (info.shape[0], info.shape[1]))
        else:
            raise UserError(f"{gf.path}: tensor {name} has {len(info.shape)} dimensions; a llama "
                            "GGML file has only vectors and matrices.")
        module = target.rsplit(".", 1)[0]
        weights[target] = _unpermute_qk(cfg, module, w)
    backend = TorchBackend(numerics)
    model = build_model(ARCHITECTURES["llama"], cfg, weights, source=str(gf.path), backend=backend)
    fuse_projections(model, backend.can_fuse)
    model.kv_dtype = torch.float16 if numerics == "fast" else torch.float32
    return model, cfg


def _tokenizer(spec: GGMLSpec, opts: LoadOptions):
    """The tokenizer from -t (repo, dir or tokenizer.json) or --tokenizer-json: GGML files keep
    scores but no merges, so their vocab cannot tokenize."""
    from .loaded import read_json as _read_json
    from .tokenizer import tokenizer_from_file

    tok_json = Path(spec.tokenizer_json).expanduser() if spec.tokenizer_json else None
    tok_cfg: dict[str, Any] | None = None
    gen_cfg: dict[str, Any] | None = None
    src = spec.tok_model_id
    if src and tok_json is None and src.endswith(".json") and hub.probe(Path(src).expanduser(), "is_file"):
        tok_json, src = Path(src).expanduser(), None
    if src:
        flag = "-t/--tok-model-id"
        tok_json = tok_json or hub.resolve_file(src, "tokenizer.json", opts.token_source, flag=flag)
        tok_cfg = _read_json(hub.resolve_file(src, "tokenizer_config.json", opts.token_source, required=False, flag=flag))
        gen_cfg = _read_json(hub.resolve_file(src, "generation_config.json", opts.token_source, required=False, flag=flag))
    if tok_json is None:
        raise UserError("a GGML model needs a tokenizer (its vocab has no merges): pass -t/--tok-model-id "
                        "(a repo, directory or tokenizer.json) or --tokenizer-json FILE.")
    if not hub.probe(tok_json, "is_file"):
        raise UserError(f"tokenizer file {tok_json} does not exist; check -t/--tokenizer-json.")
    tok_cfg = dict(tok_cfg or {})
    eos = (gen_cfg or {}).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    tok = tokenizer_from_file(tok_json, tok_cfg, eos)
    # no config: LLaMA's <s> / </s>, and BOS always added, as llama.cpp did for GGML files
    if "bos_token" not in tok_cfg and "eos_token" not in tok_cfg:
        bos, eos_id = tok.hf.token_to_id("<s>"), tok.hf.token_to_id("</s>")
        if bos is not None and tok.bos_id is None:
            tok.bos_id = bos
            tok.add_bos = "add_bos_token" not in tok_cfg or bool(tok_cfg["add_bos_token"])
        if eos_id is not None and tok.eos_id is None:
            tok.eos_id = eos_id
            tok.eos_ids.add(eos_id)
    return tok, tok_cfg, gen_cfg


def load_ggml(spec: GGMLSpec, opts: LoadOptions):
    """`mistralrs ggml -f model.bin -t tokenizer.json`: the Loaded bundle."""
    from ..sampling_defaults import from_generation_config
    from .chat_template import resolve_chat_template
    from .loaded import Loaded

    path = hub.resolve_model_file(spec.quantized_model_id, spec.quantized_filename, opts.token_source,
                                  "GGML", ".bin")
    tok, tok_cfg, gen_cfg = _tokenizer(spec, opts)
    gf = GGMLFile(path)
    if tok.vocab_size > gf.hparams["n_vocab"]:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but {path} has only "
                        f"{gf.hparams['n_vocab']}; pass the tokenizer that belongs to this model.")
    model, cfg = load_ggml_model(gf, spec.gqa, spec.eps, spec.rope_theta, opts.numerics)
    set_dtype(model, opts.dtype)
    prepare_weights(model, release=gf.release)
    template = resolve_chat_template(opts.chat_template, tok_cfg, None)
    name = spec.quantized_model_id or path.name
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    return Loaded(model, tok, template, cfg, name, set(tok.eos_ids), bos or "", eos or "",
                  from_generation_config(gen_cfg))
