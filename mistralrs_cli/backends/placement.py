"""Layer placement for -n/--num-device-layers: the first N decoder layers on the GPU, the rest
on the CPU. Pure functions, so the rule is tested on machines with no GPU.

The embedding table and the final norm + LM head go with the first and the last layer
respectively, so a 0-layer placement is all-CPU and a full one all-GPU; activations cross
devices only where the layer devices change (`boundaries`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    layers: tuple[str, ...]  # device of each decoder layer, in order
    embed: str
    head: str
    warning: str | None = None  # one line for the user when -n was clamped
    device: str = "cuda"  # the accelerator the first layers go to

    @property
    def boundaries(self) -> list[int]:
        """Layers whose input arrives from another device (0 if it differs from the embedding)."""
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
    first, last = (layers[0], layers[-1]) if layers else (host, host)
    return Placement(layers, embed=first, head=last, warning=warning, device=device)


def to_layer(h: torch.Tensor, placement: Placement, i: int) -> torch.Tensor:
    """Activations entering layer i, moved if that layer lives elsewhere (a no-op otherwise)."""
    dev = placement.layers[i]
    return h if h.device.type == torch.device(dev).type else h.to(dev)


def assign_backends(model: torch.nn.Module, placement: Placement, device_backend) -> int:
    """Quantized linears (QLinear, FusedQLinear) of the layers placed on the device, and the LM
    head if it is, multiply with `device_backend`; the others keep theirs. Returns how many moved.
    Models are CausalLM-shaped: model.model.layers[i], model.lm_head."""
    groups = [layer for layer, dev in zip(model.model.layers, placement.layers) if dev == placement.device]
    if placement.head == placement.device:
        groups.append(model.lm_head)
    count = 0
    for group in groups:
        for module in group.modules():
            if hasattr(module, "qweight") and hasattr(module, "backend"):
                module.backend = device_backend
                count += 1
    return count
