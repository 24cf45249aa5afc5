"""The native CPU runtime: a GGUF model of the llama family run by csrc's kernels on numpy arrays,
without importing torch.

torch costs ~220 MB of resident memory and ~1.5 s to import, more than a 135M-parameter model's
weights and its whole load. For the common case (a GGUF file of the llama family whose
projections the native kernels multiply, on the CPU, fast or precise numerics, f32 activations) the
loader builds this model straight from the file instead of a torch module tree:

  h    = embed(ids) [* sqrt(hidden)]                        gguf.quants.dequantize of the rows
  per layer, as backends/native_decoder.py does for the torch models (the same C calls):
  qkv  = [norm ->] h @ Wqkv (+ bias)                        qmm_parts, RMSNorm fused before
  q, k : per-head norm, rotary                              rope_rows
  att  = softmax(q k^T) v over the KV cache                 attn_batch (all sequences)
  h   += [post-norm] att @ Wo                               qmm_parts, norm + residual fused after
  gu   = [norm ->] h @ W[gate|up]                           qmm_parts
  h   += [post-norm] act(gate) * up @ Wdown                 qmm_parts, activation fused before
  logits = norm(h[rows]) @ Wout [softcapped]                qmm_parts

Projections stored as F32, F16 or BF16 (a full- or half-precision file) are multiplied in f32 by
csrc/floatmm.c behind the same qmm_parts calls, with an f32 KV cache.

Everything else falls back to the torch models (the loader asks `NativeModel.build`, which says
None): other architectures, weight types without a native kernel, --numerics exact, --dtype
other than f32, a GPU, no C compiler. Its reference is that torch path: tests compare the two,
and the comparisons with llama.cpp (greedy and teacher-forced) run on this one.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.batch import Batch
from ..models.config import ModelConfig
from ..models.rope import ROPE_INV_FREQ, RopeTable
from . import native
from .native_threads import ThreadPolicy

ARCHS = {"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"}
_GEMMA = {"gemma", "gemma2", "gemma3"}
_F32 = np.dtype(np.float32)
_CHUNK = 16 << 20  # bytes of the file repacked between releases of its pages


@dataclass
class _Layer:
    qkv: native.Plan
    qkv_opts: native.QmmOpts
    o: native.Plan
    o_opts: native.QmmOpts  # .residual set per call
    gate_up: native.Plan
    gate_up_opts: native.QmmOpts
    down: native.Plan
    down_opts: native.QmmOpts
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    rope: RopeTable
    window: int | None
    scale: float
    softcap: float | None
    calls: Any = None  # the kernels' arguments, precomputed (_Calls)


class _Calls:
    """One layer's constant kernel arguments: plan arrays, opts by reference, norm addresses."""

    def __init__(self, L: _Layer, eps: float):
        self.qkv, self.qkv_n, self.qkv_opts = L.qkv.array, L.qkv.count, ctypes.byref(L.qkv_opts)
        self.o, self.o_n, self.o_opts = L.o.array, L.o.count, ctypes.byref(L.o_opts)
        self.gu, self.gu_n, self.gu_opts = L.gate_up.array, L.gate_up.count, ctypes.byref(L.gate_up_opts)
        self.down, self.down_n, self.down_opts = L.down.array, L.down.count, ctypes.byref(L.down_opts)
        self.qn = None if L.q_norm is None else L.q_norm.ctypes.data
        self.kn = None if L.k_norm is None else L.k_norm.ctypes.data
        self.eps = eps if L.q_norm is not None else 0.0
        self.window, self.scale, self.softcap = L.window or 0, L.scale, L.softcap or 0.0


class _Unfit(Exception):
    """This file is not one the native runtime serves (the torch models will)."""


class NativeModel:
    """A loaded model as the engine uses it: `config`, `dtype`, `kv_round_to`, `step()`; and
    `model(ids, batch)` as the torch models are called (tests)."""

    dtype = _F32  # activations
    # the KV cache holds f16, as llama.cpp's does, in both modes: half the bytes a long context
    # streams per token, and for "precise" over 512 teacher-forced positions still the exact
    # path's top-1 at 100% with mean KL 3.8e-7 / 3.7e-7 nats (SmolLM2 / Gemma-3; f32: 4e-8 / 6e-8)
    cache_dtype = np.dtype(np.float16)
    kv_round_to = None  # (stored as f16 already)

    @classmethod
    def build(cls, gf, cfg: ModelConfig, release=None, numerics: str = "precise") -> "NativeModel | None":
        """The model, or None when some part of this file needs the torch path. numerics:
        "precise" (activations rounded in two 8-bit parts, ~16 bits, or once to 16-bit codes
        against Q8_0 without VNNI: within float noise of the exact path's logits) or "fast" (one
        8-bit rounding per block of activations, as llama.cpp's CPU kernels round); both keep an
        f16 KV cache."""
        lib = native.library()
        if lib is None or gf.architecture not in ARCHS or cfg.num_local_experts:
            return None
        try:
            return cls(gf, cfg, lib, release, numerics)
        except _Unfit:
            return None

    def __init__(self, gf, cfg: ModelConfig, lib, release=None, numerics: str = "precise"):
        if numerics not in ("fast", "precise"):
            raise ValueError(f"numerics {numerics!r}: the native runtime does 'fast' or 'precise'")
        self.config, self.lib, self.gf = cfg, lib, gf
        self.numerics = numerics
        pr = numerics == "precise"
        self.kv16 = int(self.cache_dtype == np.float16)
        arch, t = gf.architecture, gf.tensors
        self.arch = arch
        act = native.ACTS.get(cfg.hidden_act)
        if act is None:
            raise _Unfit(cfg.hidden_act)
        self.nq, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.gemma = arch in _GEMMA
        self._keep: list[Any] = []
        sandwich = "blk.0.post_attention_norm.weight" in t
        layer_types = cfg.layer_types
        if arch == "gemma2" and layer_types is None:  # even layers slide (Gemma2ForCausalLM's default)
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(cfg.num_hidden_layers)]
        sliding = cfg.sliding_window
        if arch in ("qwen2", "qwen3") and layer_types is None and not cfg.extra.get("use_sliding_window", False):
            sliding = None  # as models/qwen2.py's qwen_window_config

        # every weight this model multiplies, checked before any is repacked
        names = []
        for i in range(cfg.num_hidden_layers):
            names += [f"blk.{i}.attn_{x}.weight" for x in ("q", "k", "v", "output")]
            names += [f"blk.{i}.ffn_{x}.weight" for x in ("gate", "up", "down")]
        head = "output.weight" if "output.weight" in t else "token_embd.weight"
        d, inter, q_rows, kv_rows = cfg.hidden_size, cfg.intermediate_size, self.nq * self.hd, self.nkv * self.hd
        want = {"attn_q": (q_rows, d), "attn_k": (kv_rows, d), "attn_v": (kv_rows, d), "attn_output": (d, q_rows),
                "ffn_gate": (inter, d), "ffn_up": (inter, d), "ffn_down": (d, inter)}
        for name in names + [head]:
            info = t.get(name)
            if info is None or info.qtype not in native.TYPES | native.FLOAT_TYPES or len(info.shape) != 2:
                raise _Unfit(name)
            if info.qtype not in native.FLOAT_TYPES and info.shape[1] % (256 if info.qtype in native.K_TYPES else 32):
                raise _Unfit(name)
            # a shape that disagrees with the metadata: the torch loader names it in its error
            expect = want.get(name.split(".")[-2], (cfg.vocab_size, d))
            if tuple(info.shape) != expect:
                raise _Unfit(name)
        # F32 / F16 / BF16 projections (csrc/floatmm.c): f32 arithmetic end to end, so an f32
        # KV cache too (the torch path's); a file mixing them with quantized ones goes to torch
        self.float_weights = t[names[0]].qtype in native.FLOAT_TYPES
        if any((t[n].qtype in native.FLOAT_TYPES) != self.float_weights for n in names):
            raise _Unfit("float and quantized projections mixed")
        if self.float_weights:
            self.cache_dtype, self.kv16 = _F32, 0
        embd = t.get("token_embd.weight")
        if embd is None or tuple(embd.shape) != (cfg.vocab_size, d):
            raise _Unfit("token_embd.weight")

        # repacked in slices of ~16 MB of the file, each slice's file pages dropped once it is
        # done, so a big tensor (Gemma's 262k-row output) never has all of its file pages and all
        # of its repacked copy resident at once; biggest first (a lower peak), all in one C call
        # that does not hold Python's lock
        plans: dict[str, native.Plan] = {}
        slices = []
        for name in sorted(set(names) | {head}, key=lambda n: -t[n].nbytes):
            raw, from_file = self._rows(name, cfg)
            step = max(8, (_CHUNK // max(1, raw.shape[1])) // 8 * 8)
            slices += [(name, (raw[r0:r0 + step], t[name].qtype, len(raw[r0:r0 + step]), from_file))
                       for r0 in range(0, raw.shape[0], step)]
        parts: dict[str, list] = {}
        for (name, _), plan in zip(slices, native.plans_at_once([part for _, part in slices], lib)):
            parts.setdefault(name, []).append(plan)
        for name, ps in parts.items():
            plans[name] = ps[0] if len(ps) == 1 else native.Plan.join(ps)
        if release is not None:
            release()

        self.layers: list[_Layer] = []
        ropes: dict[tuple, RopeTable] = {}
        eps = cfg.rms_norm_eps
        for i in range(cfg.num_hidden_layers):
            b = f"blk.{i}."
            window = sliding if (layer_types[i] == "sliding_attention" if layer_types else sliding is not None) else None
            base, scaling = cfg.rope_theta, cfg.rope_scaling or {}
            if window is not None and cfg.rope_local_base_freq is not None:
                base, scaling = cfg.rope_local_base_freq, {}
            rot = int(self.hd * cfg.partial_rotary_factor)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            key = (kind, rot, base, repr(sorted(scaling.items())))
            if key not in ropes:  # one table per distinct rotary: layers share it within a forward
                if kind not in ROPE_INV_FREQ:
                    raise _Unfit(kind)
                ropes[key] = RopeTable(rot, *ROPE_INV_FREQ[kind](rot, base, scaling, cfg.max_position_embeddings,
                                                                 cfg.max_position_embeddings))
            pre_attn = self._norm(b + "attn_norm.weight")
            pre_ffn = self._norm(b + "ffn_norm.weight")
            post_attn = self._norm(b + "post_attention_norm.weight") if sandwich else None
            post_ffn = self._norm(b + "post_ffw_norm.weight") if sandwich else None
            qkv_bias = self._biases([b + f"attn_{x}" for x in "qkv"])
            scalar = cfg.query_pre_attn_scalar
            self.layers.append(_Layer(
                native.Plan.join([plans[b + f"attn_{x}.weight"] for x in "qkv"]),
                native.qmm_opts(pre_attn, eps, bias=qkv_bias, precise=pr),
                plans[b + "attn_output.weight"],
                native.qmm_opts(bias=self._biases([b + "attn_output"]), post=post_attn, post_eps=eps, precise=pr),
                native.Plan.join([plans[b + "ffn_gate.weight"], plans[b + "ffn_up.weight"]]),
                native.qmm_opts(pre_ffn, eps, bias=self._biases([b + "ffn_gate", b + "ffn_up"]), precise=pr),
                plans[b + "ffn_down.weight"],
                native.qmm_opts(act=act, bias=self._biases([b + "ffn_down"]), post=post_ffn, post_eps=eps,
                                precise=pr),
                self._norm(b + "attn_q_norm.weight", required=False),
                self._norm(b + "attn_k_norm.weight", required=False),
                ropes[key], window, (scalar if scalar else self.hd) ** -0.5,
                cfg.attn_logit_softcapping))
        for L in self.layers:
            L.calls = _Calls(L, eps)
        self.dec = (native.DecLayer * len(self.layers))()
        for d, L in zip(self.dec, self.layers):
            c = L.calls
            for name in ("qkv", "o", "gu", "down"):
                setattr(d, name, ctypes.addressof(getattr(c, name)))
                setattr(d, name + "_n", getattr(c, name + "_n"))
            for name, opts in (("qkv", L.qkv_opts), ("o", L.o_opts), ("gu", L.gate_up_opts), ("down", L.down_opts)):
                setattr(d, name + "_opts", ctypes.addressof(opts))
            d.rot, d.qn, d.kn, d.eps = L.rope.dim, c.qn, c.kn, c.eps
            d.scale, d.softcap, d.window = c.scale, c.softcap, c.window
        self.norm, self.norm_eps = self._norm("output_norm.weight"), eps
        self.head, self.head_opts = plans[head], native.qmm_opts(self.norm, eps, bias=self._biases(["output"]),
                                                                          precise=pr)
        self.embd, self.embd_type = gf.raw_np("token_embd.weight"), t["token_embd.weight"].qtype
        self.embed_multiplier = math.sqrt(cfg.hidden_size) if self.gemma else None
        self.gate_up_rows = self.layers[0].gate_up.rows
        self.pool = ThreadPolicy()  # threads per step: fewer when a busy neighbour starves one
        self.adapter_bank, self._adapters = None, None  # set_adapters

    def set_adapters(self, bank) -> None:
        """Serve an AdapterBank's LoRA side paths beside the quantized weights (None: none); a
        forward applies them with its adapter weights (native_lora.py, csrc/lora.c)."""
        from .native_lora import NativeAdapters

        if self._adapters is not None:
            self._adapters.detach()
        self.adapter_bank, self._adapters = None, None
        if bank is not None:
            self._adapters = NativeAdapters.on_model(bank, self)
            self.adapter_bank = bank

    # ---- weights from the file ----
    def _rows(self, name: str, cfg: ModelConfig) -> tuple[np.ndarray, bool]:
        """A weight's block rows, with llama.cpp's q/k row interleave undone for llama files, and
        whether they are the file mapping's bytes (not a reordered copy)."""
        raw = self.gf.raw_np(name)
        if self.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            half = raw.shape[0] // heads // 2
            order = np.arange(raw.shape[0]).reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)
            return raw[order], False
        return raw, True

    def _vector(self, name: str, size: int) -> np.ndarray | None:
        info = self.gf.tensors.get(name)
        if info is None:
            return None
        if int(np.prod(info.shape)) != size:
            raise _Unfit(name)  # the torch loader names the mismatch in its error
        from gguf.quants import dequantize

        return np.ascontiguousarray(dequantize(self.gf.raw_np(name), info.qtype).reshape(-1), dtype=np.float32)

    def _norm(self, name: str, required: bool = True) -> np.ndarray | None:
        w = self._vector(name, self.hd if "attn_q_norm" in name or "attn_k_norm" in name else self.config.hidden_size)
        if w is None:
            if required:
                raise _Unfit(name)
            return None
        if self.gemma:  # stored as (1 + w); computed as the torch path does: (w - 1) + 1
            w = (w - np.float32(1.0)) + np.float32(1.0)
        self._keep.append(w)
        return w

    def _biases(self, prefixes: list[str]) -> np.ndarray | None:
        """The joint bias of stacked projections (zeros where one has none), or None."""
        rows = [self.gf.tensors[p + ".weight"].shape[0] if p + ".weight" in self.gf.tensors else 0 for p in prefixes]
        parts = [self._vector(p + ".bias", r) for p, r in zip(prefixes, rows)]
        if all(x is None for x in parts):
            return None
        out = np.concatenate([x if x is not None else np.zeros(r, np.float32) for x, r in zip(parts, rows)])
        self._keep.append(out)
        return out

    # ---- the engine's interface ----
    def step(self, ids: list[int], positions: list[int], seqs: list, rows: list[int],
             hidden: bool = False, adapter_weights: np.ndarray | None = None) -> np.ndarray:
        """Logits of `rows`; hidden=True (X-LoRA's scaling pass): every row's final hidden state
        after the output norm (transformers' hidden_states[-1]) instead."""
        self._want_hidden = hidden
        try:
            return self.forward(np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), seqs,
                                None if hidden else np.asarray(rows, dtype=np.int64), adapter_weights)
        finally:
            self._want_hidden = False

    def __call__(self, input_ids, batch: Batch):
        """The torch models' calling convention; a torch tensor in gives a torch tensor out."""
        rows = None if batch.logits_rows is None else np.asarray(batch.logits_rows, dtype=np.int64)
        out = self.forward(np.asarray(input_ids, dtype=np.int64).reshape(-1),
                           np.asarray(batch.positions, dtype=np.int64).reshape(-1), batch.seqs, rows,
                           batch.adapter_weights)
        if type(input_ids).__module__.startswith("torch"):
            import torch

            return torch.from_numpy(out)
        return out

    def embed(self, ids: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        h = dequantize(self.embd[ids], self.embd_type).reshape(len(ids), -1)
        h = np.array(h, dtype=np.float32, order="C")  # owned, writable: the residual stream
        if self.embed_multiplier is not None:
            h *= np.float32(self.embed_multiplier)
        return h

    def forward(self, ids: np.ndarray, positions: np.ndarray, seqs: list, rows: np.ndarray | None,
                adapter_weights: np.ndarray | None = None) -> np.ndarray:
        """Logits of `rows` (None: all); adapter_weights (slots, T, adapters) weigh the bank's LoRA
        side paths per row (adapters/bank.py), None: none on any row."""
        from ..engine.kv_cache import SeqKVCache

        lib, nq, nkv, hd = self.lib, self.nq, self.nkv, self.hd
        T = len(ids)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        h = self.embed(ids)
        qkv = np.empty((T, (nq + 2 * nkv) * hd), dtype=np.float32)
        att = np.empty((T, nq * hd), dtype=np.float32)
        gu = np.empty((T, self.gate_up_rows), dtype=np.float32)
        y = np.empty_like(h)
        caches = [s.cache if s.cache is not None else
                  SeqKVCache(len(self.layers), nkv, hd, self.cache_dtype, capacity=s.end - s.start)
                  for s in seqs]
        if any(c.dtype != self.cache_dtype for c in caches):
            raise ValueError(f"the native runtime's KV caches hold {self.cache_dtype}: make them with cache_for(model)")
        entries = (native.AttnSeq * len(seqs))()
        ldq, ldo = qkv.shape[1], att.shape[1]
        for e, s in zip(entries, seqs):
            e.q, e.n = qkv.ctypes.data + 4 * s.start * ldq, s.end - s.start
            e.out, e.pos = att.ctypes.data + 4 * s.start * ldo, positions.ctypes.data + 8 * s.start
        k = qkv[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd)
        v = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd)
        memo: dict = {}
        th, started = self.pool.pick(T), self.pool.start()
        keep = []
        # the per-layer calls straight to the library with precomputed addresses: on a 135M model
        # the Python between kernel calls was a third of a decode step
        qmm, rope_rows, kv_store, attn = lib.qmm_parts, lib.rope_rows, lib.kv_store, lib.attn_batch
        d, hp, qkvp, attp, gup, yp = h.shape[1], h.ctypes.data, qkv.ctypes.data, att.ctypes.data, gu.ctypes.data, y.ctypes.data
        q_width, gu_rows, nseq = nq * hd, gu.shape[1], len(seqs)
        inter = gu_rows // 2
        spans = [(e, s.end - s.start, s.start, s.end, c) for e, s, c in zip(entries, seqs, caches)]
        for L in self.layers:  # residual adds go into h
            L.o_opts.residual = L.down_opts.residual = hp
            L.o_opts.ld_res = L.down_opts.ld_res = d
        if adapter_weights is not None and self._adapters is None:
            raise ValueError("adapter weights given to a model without adapters (set_adapters first)")
        if self._adapters is not None:
            self._adapters.begin(adapter_weights, T)
        try:
            if all(c.native_layers_ok() for c in caches):
                self._layers_in_c(caches, spans, entries, positions, memo, h, qkv, att, gu, y, th)
                return self._head(h, rows, th)
            for i, L in enumerate(self.layers):
                c = L.calls
                if qmm(c.qkv, c.qkv_n, d, hp, d, T, qkvp, ldq, th, c.qkv_opts):
                    raise RuntimeError("native qmm refused the qkv projection")
                tab = memo.get(id(L.rope))
                if tab is None:
                    cos, sin = L.rope.tables(positions, memo)
                    tab = memo[id(L.rope)] = (cos.ctypes.data, sin.ctypes.data)
                rope_rows(qkvp, T, ldq, nq, nkv, hd, L.rope.dim, tab[0], tab[1], c.qn, c.kn, c.eps)
                keep.clear()
                for e, n, start, end, cache in spans:
                    where = cache.native_slots(i, n)
                    if where is None:  # a fragmented paged cache: stored and gathered by numpy
                        ks, vs = cache.update(i, k[start:end], v[start:end])  # (Hkv, S, D)
                        if ks.strides[-1] != ks.itemsize or vs.strides != ks.strides:
                            ks, vs = np.ascontiguousarray(ks), np.ascontiguousarray(vs)
                        keep.append((ks, vs))  # kv_store below rewrites the new rows: same values
                        sz = ks.itemsize
                        where = (ks.ctypes.data, vs.ctypes.data, ks.shape[1], ks.strides[0] // sz, ks.strides[1] // sz)
                    e.k, e.v, e.S, e.sh, e.ss = where
                kv_store(entries, nseq, ldq, nq, nkv, hd, self.kv16)
                attn(entries, nseq, ldq, ldo, nq, nkv, hd, c.window, c.scale, c.softcap, th, self.kv16)
                if (qmm(c.o, c.o_n, q_width, attp, ldo, T, yp, d, th, c.o_opts)
                        or qmm(c.gu, c.gu_n, d, hp, d, T, gup, gu_rows, th, c.gu_opts)
                        or qmm(c.down, c.down_n, inter, gup, gu_rows, T, yp, d, th, c.down_opts)):
                    raise RuntimeError("native qmm refused a projection")
            return self._head(h, rows, th)
        finally:
            for L in self.layers:
                L.o_opts.residual = L.down_opts.residual = None
            if self._adapters is not None:
                self._adapters.end()
            self.pool.record(T, th, started)

    def _layers_in_c(self, caches, spans, entries, positions, memo, h, qkv, att, gu, y, th) -> None:
        """Every layer in one decoder_layers call (csrc/decoder.c), when every sequence's cache is
        one slice per layer."""
        nl, nseq = len(self.layers), len(caches)
        kv = np.empty((nl, nseq, 2), dtype=np.int64)
        for j, (e, n, _, _, cache) in enumerate(spans):
            k, v, e.S, e.sh, e.ss = cache.native_layers(n)
            kv[:, j, 0], kv[:, j, 1] = k, v
        for d, L in zip(self.dec, self.layers):
            tab = memo.get(id(L.rope))
            if tab is None:
                cos, sin = L.rope.tables(positions, memo)
                tab = memo[id(L.rope)] = (cos.ctypes.data, sin.ctypes.data)
            d.cos_t, d.sin_t = tab
        T, nq, nkv, hd = h.shape[0], self.nq, self.nkv, self.hd
        failed = self.lib.decoder_layers(self.dec, nl, entries, nseq, kv.ctypes.data, h.ctypes.data,
                                         qkv.ctypes.data, att.ctypes.data, gu.ctypes.data, y.ctypes.data, T,
                                         h.shape[1], nq, nkv, hd, gu.shape[1], self.kv16, th)
        if failed:
            raise RuntimeError(f"native qmm refused a projection of layer {failed - 1}")

    def _head(self, h: np.ndarray, rows: np.ndarray | None, n_threads: int) -> np.ndarray:
        if rows is not None:
            h = np.ascontiguousarray(h[rows])
        if getattr(self, "_want_hidden", False):  # the output norm alone, as the torch RMSNorm computes it
            ms = np.mean(np.square(h, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
            return (h / np.sqrt(ms + np.float32(self.norm_eps))) * self.norm
        logits = native.qmatmul(h, self.head, self.lib, self.head_opts, n_threads=n_threads)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = np.tanh(logits / np.float32(cap)) * np.float32(cap)
        return logits

