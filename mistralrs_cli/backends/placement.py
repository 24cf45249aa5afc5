"""Layer placement for -n/--num-device-layers: the first N decoder layers run wholly on the
device (their norms, attention, KV-cache writes and matmuls on device tensors), the rest on the
CPU. The embedding table stays on the CPU (a row lookup needs no accelerator); the final norm and
LM head go on the device only when every layer does, so the hidden state crosses devices once
on the way in (before layer 0) and once on the way out (after the last device layer, or as
logits when the head is on the device).

The device is a parameter (the device backend's `device`): tests run this same code with the CPU
as the stand-in device and the CUDA emulator as the launcher, and on torch's meta device to prove
that no CPU tensor reaches a device layer. `DeviceRun.transfers` records every move.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.layers import Batch, SeqSlice


@dataclass(frozen=True)
class Placement:
    layers: tuple[str, ...]  # device of each decoder layer, in order
    embed: str
    head: str  # final norm + LM head
    warning: str | None = None  # one line for the user when -n was clamped
    device: str = "cuda"  # the accelerator the first layers go to

    @property
    def n_device(self) -> int:
        return sum(1 for d in self.layers if d == self.device)

    @property
    def boundaries(self) -> list[int]:
        """Layers whose input arrives from another device (the embedding's output included)."""
        prev, out = self.embed, []
        for i, dev in enumerate(self.layers):
            if dev != prev:
                out.append(i)
            prev = dev
        return out


def place_layers(n_layers: int, num_device_layers: int | None, device: str = "cuda",
                 host: str = "cpu") -> Placement:
    """None: every layer on `device`. N outside 0..n_layers is clamped, with a warning."""
    n, warning = n_layers if num_device_layers is None else num_device_layers, None
    if n > n_layers:
        warning = (f"--num-device-layers {n}: the model has {n_layers} layers; "
                   f"all {n_layers} go on {device}")
        n = n_layers
    elif n < 0:
        warning = f"--num-device-layers {n} is negative; every layer stays on {host}"
        n = 0
    layers = (device,) * n + (host,) * (n_layers - n)
    head = device if n_layers and n == n_layers else host
    return Placement(layers, embed=host, head=head, warning=warning, device=device)


def move_module(module: nn.Module, device: torch.device) -> None:
    """Parameters, buffers and plain tensor attributes of `module` and its children, as new
    tensors on `device`. New objects, not `param.data` swaps: a weight tied to one that stays on
    the CPU (an LM head tied to the embedding) stays there, and caches keyed on the identity of a
    weight (RMSNorm's scale) are rebuilt on the device."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device != device:
                mod._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not name.startswith("_") and v.device != device:
                setattr(mod, name, v.to(device))  # e.g. phi3's long/short rope factors
        if getattr(mod, "_scale", None) is not None:
            mod._scale = None


class DeviceKV:
    """One sequence's KV cache as the device layers see it: their layers' buffers live on the
    device (moved there once, when a device layer first writes), the other layers' stay on the
    CPU. Wraps the engine's caches (engine/kv_cache.SeqKVCache, engine/paged.PagedSeqCache)
    without changing them; lengths, truncation and block tables remain the wrapped cache's."""

    def __init__(self, cache, device: torch.device):
        self.cache, self.device = cache, device

    def __len__(self) -> int:
        return len(self.cache)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, dev = self.cache, self.device
        pool_owner = getattr(c, "kv", None)
        if pool_owner is None:  # SeqKVCache: per-layer k and v buffers
            n, t = c.lengths[layer], k.shape[0]
            for buf in (c.k, c.v):
                old = buf[layer]
                if old.device != dev or n + t > old.shape[1]:
                    # grown here, on the device, as the cache would (capacity doubling); its own
                    # growth allocates on the CPU
                    cap = old.shape[1] if n + t <= old.shape[1] else max(2 * old.shape[1], n + t)
                    grown = torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype, device=dev)
                    grown[:, :n] = old[:, :n].to(dev)
                    buf[layer] = grown
            return c.update(layer, k, v)
        pool = pool_owner.kv[layer]  # PagedKV: one pool per layer, shared by every sequence
        if pool.device != dev:
            n_kv = pool_owner.shape.n_kv
            pool = pool_owner.kv[layer] = pool.to(dev)
            pool_owner.k[layer], pool_owner.v[layer] = pool[:n_kv], pool[n_kv:]
        if c.contiguous:  # slices of the pool: device-agnostic
            return c.update(layer, k, v)
        # a fragmented sequence gathers through its slot indices, which must be on the device
        n, t, h = c.lengths[layer], k.shape[0], k.shape[1]
        c.lengths[layer] = n + t
        new = torch.cat([k, v], 1).transpose(0, 1)  # (2 Hkv, T, D)
        if pool_owner.round_to is not None:
            new = new.to(pool_owner.round_to)
        idx = c.slots(n + t).to(dev)
        pool.index_copy_(1, idx[n:], new.to(pool.dtype))
        out = pool.index_select(1, idx)
        return out[:h], out[h:]


@dataclass
class DeviceRun:
    """The forward hooks that carry a model's hidden state across the device boundary, and a
    record of every move they make: (what, index, direction), direction 'in' (to the device) or
    'out' (to the CPU). Activations cross at most twice per forward; `positions` (the batch's
    position ids, a few int64s) go to the device once per forward."""

    device: torch.device
    placement: Placement
    transfers: list[tuple[str, int, str]] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def move(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.to(device)

    def _to_device(self, t: torch.Tensor, what: str, i: int) -> torch.Tensor:
        self.transfers.append((what, i, "in"))
        return self.move(t, self.device)

    def _to_host(self, t: torch.Tensor, what: str, i: int) -> torch.Tensor:
        self.transfers.append((what, i, "out"))
        return self.move(t, torch.device(self.placement.embed))

    def device_batch(self, batch: Batch) -> Batch:
        """The batch as the device layers see it (made once per forward): positions on the device,
        caches wrapped in DeviceKV, and a memo of its own (rotary tables and masks on the device;
        the CPU layers keep theirs)."""
        key = ("device_batch", str(self.device))
        db = batch.memo.get(key)
        if db is None:
            seqs = [SeqSlice(s.start, s.end, None if s.cache is None else DeviceKV(s.cache, self.device))
                    for s in batch.seqs]
            db = batch.memo[key] = Batch(self._to_device(batch.positions, "positions", 0), seqs,
                                         batch.logits_rows)
        return db

    def install(self, model: nn.Module) -> None:
        p, layers = self.placement, model.model.layers
        for i, layer in enumerate(layers):
            if p.layers[i] != p.device:
                continue
            first = i == 0 or p.layers[i - 1] != p.device

            def pre(module, args, i=i, first=first):
                h, batch = args
                return (self._to_device(h, "hidden", i) if first else h), self.device_batch(batch)

            self.handles.append(layer.register_forward_pre_hook(pre))
            if i + 1 < len(layers) and p.layers[i + 1] != p.device:
                self.handles.append(layer.register_forward_hook(
                    lambda module, args, out, i=i: self._to_host(out, "hidden", i + 1)))
        if p.head == p.device:
            self.handles.append(model.register_forward_hook(
                lambda module, args, out: self._to_host(out, "logits", len(layers))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def assign_backends(model: nn.Module, placement: Placement, device_backend) -> int:
    """Put the layers `placement` gives the device on `device_backend.device`: their quantized
    linears (QLinear, FusedQLinear) multiply with `device_backend`, their other weights move there,
    and hooks move the hidden state across the boundary (`model.device_run`). The final norm and
    LM head follow when the placement puts the head on the device. Returns how many linears moved.
    Models are CausalLM-shaped: model.model.layers[i], model.model.norm, model.lm_head."""
    device = torch.device(device_backend.device)
    groups = [layer for layer, dev in zip(model.model.layers, placement.layers) if dev == placement.device]
    if placement.head == placement.device:
        groups += [model.model.norm, model.lm_head]
    count = 0
    for group in groups:
        for module in group.modules():
            if hasattr(module, "qweight") and hasattr(module, "backend"):
                module.backend = device_backend
                count += 1
        move_module(group, device)
    old = getattr(model, "device_run", None)
    if old is not None:
        old.remove()
    model.device_run = DeviceRun(device, placement)
    model.device_run.install(model)
    return count
