"""LoRA on the torch executor: the load-time merge (float bases) and the side path (everything else).

The side path wraps each adapted module (or the fused q|k|v / gate|up multiply that replaced its
parts) so its output gains sum_c (A[c]·x) * weight[l, t, adapter[c]] * scale[c] * B[:, c]
(adapters/bank.py), x being exactly what the base module multiplies. The per-forward weights come
from Batch.adapter_weights through one LoraContext per model (CausalLM.forward sets it), so the
model files know nothing about adapters.

The two small products run in float64 and are rounded to the activations' dtype once: a row's
delta then does not depend on which other rows share the forward (torch picks f32 GEMM kernels,
and so summation orders, by the row count; in f64 those differences sit ~2^-29 below an f32
rounding step). A row with no adapter gets exactly zero added.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..loaders.weights import FUSIONS, FusedLinear
from .bank import AdapterBank, AdapterFactors, Target, layer_of


class LoraContext:
    """The current forward's adapter weights, (n_layers, T, n_adapters) float64, or None."""

    def __init__(self) -> None:
        self.w: torch.Tensor | None = None

    def begin(self, weights: np.ndarray | None) -> None:
        self.w = None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float64))


class SidePath:
    """One Target as float64 torch tensors."""

    def __init__(self, target: Target):
        self.slot = target.slot  # its index in the weights' first axis (bank.py Target.slot; X-LoRA: per module)
        self.A = torch.from_numpy(target.A.astype(np.float64))  # (R, in)
        self.B = torch.from_numpy(target.B.astype(np.float64))  # (out, R)
        self.adapter = torch.from_numpy(target.adapter.astype(np.int64))
        self.scale = torch.from_numpy(target.scale.astype(np.float64))

    def delta(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        cw = w[self.slot][:, self.adapter] * self.scale  # (T, R)
        u = (x.reshape(-1, x.shape[-1]).to(torch.float64) @ self.A.T) * cw
        return (u @ self.B.T).reshape(*x.shape[:-1], self.B.shape[0])


class LoraLinear(nn.Module):
    """An adapted Linear / QLinear: base(x) + the side path."""

    def __init__(self, base: nn.Module, side: SidePath, ctx: LoraContext):
        super().__init__()
        self.base, self.side, self.ctx = base, side, ctx
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.ctx.w
        return y if w is None else y + self.side.delta(x, w).to(y.dtype)

    full = forward  # Phi-3's attention calls qkv_proj.full(x)


class FusedLora(nn.Module):
    """An adapted FusedLinear / FusedQLinear (q|k|v or gate|up in one multiply): each adapted
    part's delta is added to its columns of the joint output."""

    def __init__(self, base: nn.Module, sides: list[SidePath | None], ctx: LoraContext):
        super().__init__()
        self.base, self.sides, self.ctx, self.sizes = base, sides, ctx, base.sizes

    def full(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.full(x)
        w = self.ctx.w
        if w is None:
            return y
        off = 0
        for size, side in zip(self.sizes, self.sides):
            if side is not None:
                y[..., off:off + size] += side.delta(x, w).to(y.dtype)
            off += size
        return y

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.full(x), self.sizes, dim=-1))


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{HF module name: (out_features, in_features)} of the linear layers inside decoder layers."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            try:
                layer_of(name)
            except ValueError:
                continue
            out[name] = (int(m.out_features), int(m.in_features))
    return out


def merge_into(model: nn.Module, adapters: list[AdapterFactors]) -> None:
    """W += scale * B @ A for every adapted module of a float model (peft's merge_and_unload).
    The parts of a fused projection are views of the fused weight, so it changes with them."""
    with torch.no_grad():
        for a in adapters:
            for module, (A, B) in a.factors.items():
                lin = model.get_submodule(module)
                delta = (torch.from_numpy(B) @ torch.from_numpy(A)) * a.scale
                lin.weight.data.add_(delta.to(lin.weight.dtype))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model: nn.Module, bank: AdapterBank) -> None:
    """Wrap every adapted module (and the fused multiplies covering adapted parts) of a torch
    model; the model serves `bank` from now on (model.adapter_bank, model.lora_ctx)."""
    ctx = LoraContext()
    sides = {name: SidePath(t) for name, t in bank.targets.items()}
    for pname, parent in list(model.named_modules()):
        for fused_name, parts in FUSIONS.items():
            fused = getattr(parent, fused_name, None)
            if fused is None or not hasattr(fused, "sizes") or any(getattr(parent, p, None) is None for p in parts):
                continue  # not fused here (Phi-3's own qkv_proj is a plain adapted module)
            names = [f"{pname}.{p}" if pname else p for p in parts]
            if not any(n in sides for n in names):
                continue
            if isinstance(fused, FusedLinear):
                # a float fusion is only a speed-up: drop it, so the adapted parts run (and a later
                # /v1/re_isq quantizes them, which it could not do through a wrapped fusion)
                setattr(parent, fused_name, None)
            else:
                setattr(parent, fused_name, FusedLora(fused, [sides.get(n) for n in names], ctx))
    for name, side in sides.items():
        _set(model, name, LoraLinear(model.get_submodule(name), side, ctx))
    model.lora_ctx = ctx
    model.adapter_bank = bank
