"""Turn a {HF name: QWeight | tensor} dict into a model: the step every loader ends with.

The model is built on the meta device (no random init), then each module receives its weight:
a Linear becomes a QLinear when its weight is a QWeight, an Embedding a QEmbedding; norms and
other parameters get dense float tensors. Anything left on meta is a missing tensor.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import default_backend
from ..errors import UserError
from ..models.config import ModelConfig
from ..quant.qweight import FusedQLinear, QEmbedding, QLinear, QWeight

Weight = Union[QWeight, torch.Tensor]


def _dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return (w.dequantize() if isinstance(w, QWeight) else w).to(dtype)


def _shape(w: Weight) -> tuple[int, ...]:
    return tuple(w.shape)


def _check(name: str, w: Weight, expected: tuple[int, ...], source: str) -> None:
    got = _shape(w)
    if got != expected and not (len(expected) == 1 and got == (1, expected[0])):
        raise UserError(f"{source}: tensor {name} has shape {list(got)} but the model config "
                        f"expects {list(expected)}; the file and its config disagree.")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _place(model: nn.Module, mod_name: str, weights: dict[str, Weight], source: str,
           dtype: torch.dtype, backend) -> None:
    module = model.get_submodule(mod_name)
    w = weights[f"{mod_name}.weight"]
    bias = weights.get(f"{mod_name}.bias")
    if isinstance(module, nn.Linear):
        _check(f"{mod_name}.weight", w, (module.out_features, module.in_features), source)
        if isinstance(w, QWeight):
            b = None if bias is None else _dense(bias, dtype).view(-1)
            _set_module(model, mod_name, QLinear(w, b, backend))
            return
    elif isinstance(module, nn.Embedding):
        _check(f"{mod_name}.weight", w, (module.num_embeddings, module.embedding_dim), source)
        if isinstance(w, QWeight):
            _set_module(model, mod_name, QEmbedding(w))
            return
    for pname, value in (("weight", w), ("bias", bias)):
        param = getattr(module, pname, None)
        if value is None or param is None:
            continue
        _check(f"{mod_name}.{pname}", value, tuple(param.shape), source)
        dense = _dense(value, dtype).reshape(param.shape)
        setattr(module, pname, nn.Parameter(dense, requires_grad=False))


def build_model(cls: type[nn.Module], cfg: ModelConfig, weights: dict[str, Weight], source: str,
                dtype: torch.dtype = torch.float32, backend=None) -> nn.Module:
    backend = backend or default_backend()
    with torch.device("meta"):
        model = cls(cfg)
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied embeddings
    modules = {n.rsplit(".", 1)[0] for n in weights if n.endswith(".weight")}
    for mod_name in sorted(modules):
        try:
            model.get_submodule(mod_name)
        except AttributeError:
            continue  # a tensor this architecture does not use
        _place(model, mod_name, weights, source, dtype, backend)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta and not name.endswith("inv_freq"):
            raise UserError(f"{source}: tensor {name} is missing; the file is incomplete or "
                            "not of this architecture.")
    for m in model.modules():
        if hasattr(m, "reset"):
            m.reset()
    return model.eval()


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def set_dtype(model: nn.Module, name: str) -> None:
    """--dtype: activations and dense parameters in this dtype (auto = f32 on the CPU).
    Quantized weights stay as blocks; the backend prepares them in the activations' dtype."""
    why = getattr(model, "unsupported_dtypes", {}).get(name)
    if why:
        raise UserError(f"--dtype {name} is not usable with this model ({why}); use bf16 or f32.")
    dtype = DTYPES.get(name, torch.float32)
    model.dtype = dtype
    for p in model.parameters():
        p.data = p.data.to(dtype)


# module that receives the fused projection -> the projections it replaces, in output order
FUSIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(model: nn.Module, can_fuse) -> None:
    """Install one FusedQLinear where projections share an input and the backend can multiply
    them together (`can_fuse(list of QLinear)`); the separate modules stay for their names."""
    for module in model.modules():
        for target, names in FUSIONS.items():
            if not hasattr(module, target):
                continue
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, QLinear) for p in parts) and can_fuse(parts):
                setattr(module, target, FusedQLinear(parts))


class FusedLinear(nn.Module):
    """q/k/v or gate/up of a float checkpoint as one multiply (one GEMM of N = the parts' sum is
    faster than two or three): the weights become rows of one tensor and each part keeps a view
    of its rows, so nothing is stored twice and the HF names still address them."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        biased = any(lin.bias is not None for lin in linears)
        self.bias = None if not biased else nn.Parameter(torch.cat(
            [lin.bias if lin.bias is not None else lin.weight.new_zeros(n) for lin, n in zip(linears, self.sizes)]),
            requires_grad=False)
        for i, (lin, w) in enumerate(zip(linears, self.weight.split(self.sizes))):
            lin.weight = nn.Parameter(w, requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias.split(self.sizes)[i], requires_grad=False)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.full(x), self.sizes, dim=-1))


def fuse_float_projections(model: nn.Module) -> None:
    """FusedLinear over float projections that share an input (a plain checkpoint's)."""
    for module in model.modules():
        for target, names in FUSIONS.items():
            parts = [getattr(module, n, None) for n in names]
            if hasattr(module, target) and all(type(p) is nn.Linear for p in parts) \
                    and len({p.weight.dtype for p in parts}) == 1:
                setattr(module, target, FusedLinear(parts))


def unfuse_float_projections(model: nn.Module) -> None:
    """Drop FusedLinears (before the parts are swapped for quantized ones by ISQ)."""
    for module in model.modules():
        for target in FUSIONS:
            if isinstance(getattr(module, target, None), FusedLinear):
                setattr(module, target, None)


def active_linears(model: nn.Module):
    """The QLinear / FusedQLinear modules a forward pass calls (not those a fusion replaced)."""
    for module in model.modules():
        fused = {n for t, names in FUSIONS.items() if getattr(module, t, None) is not None for n in names}
        for name, child in module.named_children():
            if isinstance(child, (QLinear, FusedQLinear)) and name not in fused:
                yield child


def prepare_weights(model: nn.Module, release=None, every_bytes: int = 16 << 20) -> None:
    """Build every weight's compute form now, so the first token does not pay for it; `release`
    (GGUFFile.release) is called whenever ~16 MB of weights have been read, so file pages and
    compute forms (repacked copies) never peak together."""
    pending = 0
    # biggest first: while a weight is repacked its file pages are resident too, and that
    # transient peak is lowest when little else has been built yet (Gemma's 178 MB lm_head)
    for lin in sorted(active_linears(model), key=lambda lin: -lin.qweight.nbytes):
        lin.backend.prepare_for(lin.qweight, model.dtype)
        pending += lin.qweight.nbytes
        if release is not None and pending >= every_bytes:
            release()
            pending = 0
    if release is not None:
        release()
