"""The modules a sharded model runs: row-parallel outputs all-reduced, vocabulary-split
embeddings and lm_head; `shard_model` puts them in place by the table in shard.py."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .shard import REDUCED, Plan, kind_of, slice_cols, slice_rows


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks; NCCL sums device tensors only, so a CPU tensor (an embedding or head
    left on the CPU) makes the trip to this rank's GPU and back."""
    if t.is_cuda or dist.get_backend() != "nccl":
        dist.all_reduce(t)
        return t
    on_gpu = t.cuda()
    dist.all_reduce(on_gpu)
    return on_gpu.to(t.device)


class RowParallel(nn.Module):
    """y = all_reduce(x_local W_local^T) + b: the bias once, after the sum."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = getattr(inner, "in_features", None), getattr(inner, "out_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias


class ReduceAfter(nn.Module):
    """A block whose parts produce partial sums (Mixtral's experts, each split by width): one
    all-reduce over its output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return all_reduce(self.inner(*args))


class VocabEmbedding(nn.Module):
    """This rank's vocabulary rows; ids outside them give zeros, and the sum over ranks gives
    every id its row."""

    def __init__(self, inner: nn.Module, rows: range, dim: int):
        super().__init__()
        self.inner, self.start, self.stop = inner, rows.start, rows.stop
        self.embedding_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        x = self.inner(local) if self.stop > self.start else None
        if x is None:
            x = torch.zeros(*ids.shape, self.embedding_dim, device=ids.device)
        return all_reduce(x * mine[..., None].to(x.dtype))


class VocabHead(nn.Module):
    """This rank's vocabulary rows of lm_head; the logits of all ranks gathered side by side."""

    def __init__(self, inner: nn.Module, plan: Plan):
        super().__init__()
        self.inner, self.vocab, self.world = inner, plan.vocab, plan.world
        self.per = -(-plan.vocab // plan.world)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x).float()
        if y.shape[-1] < self.per:  # the last rank's share may be shorter
            y = torch.nn.functional.pad(y, (0, self.per - y.shape[-1]))
        home, y = y.device, (y.cuda() if dist.get_backend() == "nccl" else y).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        return torch.cat(parts, dim=-1)[..., : self.vocab].to(home)


def _build(kind: str, mod: nn.Module, name: str, plan: Plan) -> nn.Module:
    if kind == "reduce":
        return ReduceAfter(mod)
    if kind in REDUCED:
        inner, bias = slice_cols(mod, plan.cols(kind), name, plan.world)
        return RowParallel(inner, bias)
    if kind == "ffn_cols_partial":  # an expert's down projection: its block reduces (no bias)
        return slice_cols(mod, plan.cols(kind), name, plan.world)[0]
    rows = plan.rows(kind)
    new = slice_rows(mod, rows, name)
    if kind == "vocab_embed":
        return VocabEmbedding(new, rows[0], _embedding_dim(mod))
    if kind == "vocab_head":
        return VocabHead(new, plan)
    if hasattr(mod, "full"):  # Phi-3's qkv_proj is called as .full(x)
        new.full = new.__call__
    return new


def _embedding_dim(mod: nn.Module) -> int:
    return getattr(mod, "embedding_dim", None) or mod.qweight.shape[1]


def _drop_fusions(model: nn.Module) -> None:
    """Fused q|k|v and gate|up multiplies the loader installed over separate projections go:
    the projections are split one by one (and fused again afterwards)."""
    from ..loaders.weights import FUSIONS, FusedLinear
    from ..quant.qweight import FusedQLinear

    for module in model.modules():
        for target in FUSIONS:
            if isinstance(getattr(module, target, None), (FusedLinear, FusedQLinear)):
                setattr(module, target, None)


def _fuse_again(model: nn.Module) -> None:
    from ..loaders.weights import fuse_float_projections, fuse_projections
    from ..quant.qweight import QLinear

    fuse_float_projections(model)
    backend = next((m.backend for m in model.modules() if isinstance(m, QLinear)), None)
    if backend is not None and hasattr(backend, "can_fuse"):
        fuse_projections(model, backend.can_fuse)


def plan_for(model: nn.Module, rank: int, world: int) -> Plan:
    c = model.config
    plan = Plan(rank, world, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                c.intermediate_size, c.vocab_size)
    plan.check()
    return plan


def shard_model(model: nn.Module, rank: int, world: int) -> Plan:
    """Split `model` in place for rank `rank` of `world` (every rank calls it on the same model)."""
    plan = plan_for(model, rank, world)
    model.native = None  # the fused CPU executor knows no collectives
    _drop_fusions(model)
    targets = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            kind = kind_of(name)
            if kind is not None and child is not None:
                targets.append((parent, attr, name, child, kind))
    for parent, attr, name, child, kind in reversed(targets):  # children before their blocks
        setattr(parent, attr, _build(kind, child, name, plan))
    for m in model.modules():  # attention reads its head counts from these attributes
        if hasattr(m, "n_heads") and hasattr(m, "n_kv") and hasattr(m, "head_dim"):
            m.n_heads, m.n_kv = plan.local_heads, plan.local_kv
    _fuse_again(model)
    model.tp_plan = plan
    return plan
