"""The decoder layers of a GGUF model run by the native kernels, a handful of C calls per layer.

On a model of 135M parameters the torch path spends as long dispatching ~170 small ops per
layer as it does multiplying, so for the common block shapes this runs each layer as:
  qkv  = [norm ->] x @ Wqkv (+ bias)                       qmm_parts, RMSNorm fused before
  q, k : per-head norm, rotary                             rope_rows
  attn = softmax(q k^T) v over the KV cache                attn_batch (all sequences)
  x   += [post-norm] attn @ Wo                             qmm_parts, norm + residual fused after
  gu   = [norm ->] x @ W[gate|up]                          qmm_parts
  x   += [post-norm] act(gate) * up @ Wdown                qmm_parts, activation fused before
and the final norm + lm_head as one more call. Everything else (embeddings, the KV cache
protocol, rotary tables, masks for prompts) is the model's own code, read off its modules.

It serves pre-norm blocks with a gated MLP (Llama, Mistral, Qwen2/3, Gemma, Gemma 2/3) whose
projections the native kernels multiply; anything else (other blocks, other weight types,
--numerics exact, bf16 activations) keeps the module path, which is also this one's reference
(tests/test_native_decoder.py compares the two).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ..models.layers import Attention, Batch, GatedMLP, RMSNorm, softcap
from ..quant.qweight import FusedQLinear, QLinear
from . import native

# a forward whose largest multiply reads under this many weight bytes x rows runs its kernels on
# one thread: ~10 us of work, less than a fork + join costs once the cores are busy (tests' tiny
# models: a decode step took 5-10 ms on 2 threads of 2 shared cores, 0.3 ms on one)
SMALL_WORK = 64 * 1024


def _norm_weight(norm: RMSNorm) -> torch.Tensor:
    return (norm.weight.float() + norm.offset).contiguous()


def _plan(backend, modules: list) -> tuple[native.Plan, torch.Tensor | None] | None:
    """One kernel plan over the modules' weights (stacked by rows) and their joint bias."""
    if not all(isinstance(m, (QLinear, FusedQLinear)) for m in modules):
        return None
    if not all(backend.native_ok(m.qweight) for m in modules):
        return None
    # the modules' own plans (prepared at load), joined: nothing is repacked twice
    plan = native.Plan.join([backend.native_parts(m.qweight) for m in modules])
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat([b.float() if b is not None else torch.zeros(m.qweight.shape[0])
                          for b, m in zip(biases, modules)]).contiguous()
    return plan, bias


@dataclass
class _Layer:
    attn: Attention
    qkv: native.Plan
    qkv_opts: native.QmmOpts
    o: native.Plan
    o_opts: native.QmmOpts  # .residual set per call
    gate_up: native.Plan
    gate_up_opts: native.QmmOpts
    down: native.Plan
    down_opts: native.QmmOpts
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    keep: tuple  # tensors the opts point into


def _layer(layer, backend, act: int) -> _Layer | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn) is not Attention or type(mlp) is not GatedMLP:
        return None
    sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2/3: four norms per block
    pre_attn = layer.input_layernorm
    pre_ffn = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
    post_attn = layer.post_attention_layernorm if sandwich else None
    post_ffn = layer.post_feedforward_layernorm if sandwich else None
    norms = [n for n in (pre_attn, pre_ffn, post_attn, post_ffn, getattr(attn, "q_norm", None)) if n is not None]
    if not all(type(n) is RMSNorm for n in norms):
        return None
    qkv = _plan(backend, [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj])
    o = _plan(backend, [attn.o_proj])
    gu = _plan(backend, [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj])
    down = _plan(backend, [mlp.down_proj])
    if None in (qkv, o, gu, down):
        return None
    named = {"pre_attn": pre_attn, "pre_ffn": pre_ffn, "post_attn": post_attn, "post_ffn": post_ffn}
    w = {name: _norm_weight(n) if n is not None else None for name, n in named.items()}
    eps = {name: n.eps if n is not None else 0.0 for name, n in named.items()}
    qn = _norm_weight(attn.q_norm) if attn.qk_norm else None
    kn = _norm_weight(attn.k_norm) if attn.qk_norm else None
    pr = backend.numerics == "precise"
    return _Layer(
        attn, qkv[0], native.qmm_opts(w["pre_attn"], eps["pre_attn"], bias=qkv[1], precise=pr),
        o[0], native.qmm_opts(bias=o[1], post=w["post_attn"], post_eps=eps["post_attn"], precise=pr),
        gu[0], native.qmm_opts(w["pre_ffn"], eps["pre_ffn"], bias=gu[1], precise=pr),
        down[0], native.qmm_opts(act=act, bias=down[1], post=w["post_ffn"], post_eps=eps["post_ffn"], precise=pr),
        qn, kn, keep=(w, qkv[1], o[1], gu[1], down[1]))


class NativeDecoder:
    """Installed on a model as `model.native` by the GGUF loader when every layer qualifies."""

    def __init__(self, model, layers: list[_Layer], head: native.Plan, head_opts: native.QmmOpts, keep):
        self.model, self.layers, self.head, self.head_opts, self._keep = model, layers, head, head_opts, keep
        self.lib = native.library()
        a = layers[0].attn
        self.nq, self.nkv, self.hd = a.n_heads, a.n_kv, a.head_dim
        plans = [head] + [p for L in layers for p in (L.qkv, L.o, L.gate_up, L.down)]
        self.max_bytes = max(sum(t.nbytes for t in p.tensors) for p in plans)  # numpy or torch

    @classmethod
    def build(cls, model) -> "NativeDecoder | None":
        cfg = model.config
        act = native.ACTS.get(cfg.hidden_act)
        backend = getattr(model.lm_head, "backend", None)
        if model.dtype != torch.float32 or act is None or backend is None or not hasattr(backend, "native_ok"):
            return None
        if native.library() is None:
            return None
        layers = [_layer(layer, backend, act) for layer in model.model.layers]
        head = _plan(backend, [model.lm_head])
        if head is None or any(x is None for x in layers) or type(model.model.norm) is not RMSNorm:
            return None
        norm = _norm_weight(model.model.norm)
        head_opts = native.qmm_opts(norm, model.model.norm.eps, bias=head[1], precise=backend.numerics == "precise")
        return cls(model, layers, head[0], head_opts, (norm, head[1]))

    def handles(self, batch: Batch) -> bool:
        # LoRA side paths are applied by the torch modules (models/), not by this executor
        return batch.adapter_weights is None and all(s.cache is not None for s in batch.seqs)

    def __call__(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        h = model.model.embed_tokens(input_ids).float().contiguous()  # (T, hidden)
        mult = model.embed_multiplier()
        if mult is not None:
            h = h * torch.tensor(mult, dtype=h.dtype)
        if batch.input_embeds is not None:  # vision: image features in place of placeholder rows
            rows, vectors = batch.input_embeds
            h[rows] = vectors.float()
        T, nq, nkv, hd = h.shape[0], self.nq, self.nkv, self.hd
        qkv = torch.empty(T, (nq + 2 * nkv) * hd)
        att = torch.empty(T, nq * hd)
        gu = torch.empty(T, self.layers[0].gate_up.rows)
        y = torch.empty(T, h.shape[1])
        slots = self._slots(qkv, att, batch)
        nt = 1 if T * self.max_bytes < SMALL_WORK else torch.get_num_threads()
        self.ldq, self.threads = qkv.stride(0), nt
        for i, L in enumerate(self.layers):
            native.qmatmul(h, L.qkv, self.lib, L.qkv_opts, out=qkv, n_threads=nt)
            self._rope(L, qkv, batch)
            self._attend(i, L, slots, att, batch)
            self._residual(L.o, L.o_opts, att, h, y)
            native.qmatmul(h, L.gate_up, self.lib, L.gate_up_opts, out=gu, n_threads=nt)
            self._residual(L.down, L.down_opts, gu, h, y)
        if batch.logits_rows is not None:
            h = h[batch.logits_rows].contiguous()
        if batch.memo.get("hidden"):  # X-LoRA's scaling pass: the final-normed hidden states
            return model.model.norm(h).float()
        logits = native.qmatmul(h, self.head, self.lib, self.head_opts, n_threads=nt)
        return softcap(logits, cfg.final_logit_softcapping)

    def _slots(self, qkv: torch.Tensor, att: torch.Tensor, batch: Batch) -> tuple:
        """Per sequence, what every layer's attention needs: its k/v rows (views into the shared
        buffer) and an attn_batch entry whose query, output and position pointers stay put."""
        nq, nkv, hd, T = self.nq, self.nkv, self.hd, qkv.shape[0]
        k = qkv[:, nq * hd:(nq + nkv) * hd].view(T, nkv, hd)
        v = qkv[:, (nq + nkv) * hd:].view(T, nkv, hd)
        seqs = (native.AttnSeq * len(batch.seqs))()
        kv, ends = [], []
        for i, (e, s) in enumerate(zip(seqs, batch.seqs)):
            e.q, e.n, e.out = qkv[s.start].data_ptr(), s.end - s.start, att[s.start].data_ptr()
            pos = batch.positions[s.start:s.end]
            e.pos = pos.data_ptr()
            spans = batch.image_blocks.get(i) if batch.image_blocks else None
            if spans:  # vision (Gemma 3): the rows of an image see each other both ways
                end = torch.full((s.end - s.start,), -1, dtype=torch.int64)
                for a, b in spans:
                    end[(pos >= a) & (pos < b)] = b - 1
                e.span_end = end.data_ptr()
                ends.append(end)
            kv.append((s.cache, k[s.start:s.end], v[s.start:s.end]))
        return seqs, kv, (batch.positions, ends)

    def _residual(self, plan, opts, x, h, y) -> None:
        opts.residual, opts.ld_res = h.data_ptr(), h.stride(0)
        try:
            native.qmatmul(x, plan, self.lib, opts, out=y, n_threads=self.threads)
        finally:
            opts.residual = None

    def _rope(self, L: _Layer, qkv: torch.Tensor, batch: Batch) -> None:
        rot = L.attn.rotary
        cos, sin, _ = rot.tables(batch, torch.float32)  # (T, 1, dim), memoized per forward
        cos, sin = cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1)
        self.lib.rope_rows(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), self.nq, self.nkv, self.hd, rot.dim,
                           cos.data_ptr(), sin.data_ptr(),
                           None if L.q_norm is None else L.q_norm.data_ptr(),
                           None if L.k_norm is None else L.k_norm.data_ptr(),
                           ctypes.c_float(L.attn.q_norm.eps if L.q_norm is not None else 0.0))

    def _attend(self, i: int, L: _Layer, slots: tuple, att: torch.Tensor, batch: Batch) -> None:
        """All sequences' query rows in one C call; each row attends on its own, so its result
        does not depend on how the prompt was chunked (prefix-cache hits and recomputation give
        the same tokens) or on what else is in the batch."""
        seqs, kv, _ = slots
        a = L.attn
        keep = []
        for e, (cache, k, v) in zip(seqs, kv):
            ks, vs = cache.update(i, k, v)  # (Hkv, S, D)
            if ks.stride(-1) != 1 or vs.stride() != ks.stride():
                ks, vs = ks.contiguous(), vs.contiguous()
            keep.append((ks, vs))
            e.k, e.v, e.S = ks.data_ptr(), vs.data_ptr(), ks.shape[1]
            e.sh, e.ss = ks.stride(0), ks.stride(1)
        self.lib.attn_batch(seqs, len(seqs), self.ldq, att.stride(0), self.nq, self.nkv, self.hd,
                            a.window or 0, a.scale, a.softcap or 0.0, self.threads, 0)  # f32 caches
