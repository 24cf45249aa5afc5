"""AdapterBank: the LoRA adapters a loaded model serves, laid out once for both executors.

An adapter is a low-rank side path of a linear layer addressed by its HF module name
(`model.layers.3.self_attn.q_proj`): y += scale * B (A x), x being exactly what the base
projection multiplies (after any norm or gated activation fused before it), the sum added before
any bias-free post-norm or residual add that follows the projection. Several adapters on one
module are stacked into one `Target` (A rows and B columns side by side), so an executor does two
small f32 products per module whatever the number of adapters.

Which adapters a row of a forward uses, and how much, is that forward's weights array
(n_layers, T, n_adapters), float32: 1.0 / 0.0 for plain LoRA (the row's sequence has the adapter
active or not), X-LoRA's scalings otherwise. A rank column c of a Target on layer l then weighs
weights[l, t, adapter[c]] * scale[c]. The executors take the Target arrays and that column weight
matrix; nothing else about adapters reaches them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(module: str) -> int:
    """The decoder layer an HF module name belongs to (`model.layers.7.mlp.up_proj` -> 7)."""
    m = _LAYER.search(module)
    if m is None:
        raise ValueError(f"{module} is not inside a decoder layer (no `layers.N.` in its name)")
    return int(m.group(1))


@dataclass(eq=False)
class Target:
    """Every adapter's factors on one module, stacked: R = the sum of their ranks."""

    module: str
    layer: int
    A: np.ndarray  # (R, in_features) float32, C-contiguous
    B: np.ndarray  # (out_features, R) float32, C-contiguous
    adapter: np.ndarray  # (R,) int32: the adapter each rank column belongs to
    scale: np.ndarray  # (R,) float32: that adapter's scaling (lora_alpha / r, or / sqrt(r) with rslora)
    # the index of this module's weights in a forward's weights array: its decoder layer, or for an
    # X-LoRA bank its own slot (peft's XLoraClassifier gives every adapted module its own scalings)
    slot: int | None = None

    def __post_init__(self):
        if self.slot is None:
            self.slot = self.layer

    def column_weights(self, weights: np.ndarray) -> np.ndarray:
        """(T, R) float32 column weights from a forward's weights (n_slots, T, n_adapters)."""
        return np.ascontiguousarray(weights[self.slot][:, self.adapter] * self.scale, dtype=np.float32)

    def delta(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The reference side path in numpy: ((x A^T) * column weights) B^T, (T, out_features)."""
        u = (x.astype(np.float32) @ self.A.T) * self.column_weights(weights)
        return u @ self.B.T


@dataclass
class AdapterFactors:
    """One adapter as read from its files: its name, scaling and (A, B) per HF module name."""

    name: str
    scale: float
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (A (r, in), B (out, r))


class AdapterBank:
    """The adapters a model serves (index = position in `names`) and their stacked Targets."""

    def __init__(self, adapters: list[AdapterFactors], n_layers: int, slots: dict[str, int] | None = None):
        """`slots` (X-LoRA): module -> its index in the weights' first axis, which then has
        max(slots) + 1 entries (n_slots) instead of one per decoder layer."""
        self.names = [a.name for a in adapters]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"adapter names repeat: {self.names}")
        self.n_layers = n_layers
        self.n_slots = n_layers if slots is None else max(slots.values()) + 1
        self.targets: dict[str, Target] = {}
        modules = sorted({m for a in adapters for m in a.factors}, key=lambda m: (layer_of(m), m))
        for module in modules:
            A, B, idx, sc = [], [], [], []
            for i, a in enumerate(adapters):
                if module in a.factors:
                    fa, fb = a.factors[module]
                    A.append(np.asarray(fa, dtype=np.float32))
                    B.append(np.asarray(fb, dtype=np.float32))
                    idx += [i] * fa.shape[0]
                    sc += [a.scale] * fa.shape[0]
            self.targets[module] = Target(module, layer_of(module), np.ascontiguousarray(np.concatenate(A)),
                                          np.ascontiguousarray(np.concatenate(B, axis=1)),
                                          np.asarray(idx, dtype=np.int32), np.asarray(sc, dtype=np.float32),
                                          None if slots is None else slots[module])

    def index(self, name: str) -> int:
        return self.names.index(name)

    def weights_for(self, row_sets: list[tuple[int, list[int]]]) -> np.ndarray:
        """Plain-LoRA weights (n_slots, T, n_adapters): row_sets is (number of rows, adapter indexes
        active for them) per sequence, in batch order."""
        T = sum(n for n, _ in row_sets)
        w = np.zeros((self.n_slots, T, len(self.names)), dtype=np.float32)
        t = 0
        for n, active in row_sets:
            if active:
                w[:, t:t + n, active] = 1.0
            t += n
        return w
