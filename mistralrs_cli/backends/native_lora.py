"""An AdapterBank (adapters/bank.py) laid onto the native runtime's fused projections.

native_model.py multiplies q|k|v as one weight, gate|up as one, then o and down. Each of those
four projections of a layer gets one csrc/lora.c `qmm_lora`: the A rows of every Target that
feeds it stacked (R x in), each rank column's B values for the output span of its own module only
(q_proj's columns write the q rows, up_proj's the up half), and its first column in this
forward's column-weight matrix. The matrix (T x all layers' columns) is computed per forward
from the forward's adapter weights, as Target.column_weights does, and hung off one shared
`lora_fw`; without adapter weights its pointer is NULL and qmm_parts runs exactly as without a
bank. The rows a projection sees are its own (after the fused norm / gated activation), so the
side path is y += scale * B (A x) with x what the base weight multiplies, before any bias-free
post-norm and residual add, as bank.py asks.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..adapters.bank import AdapterBank

# HF module leaf name -> (fused projection, its segment among the projection's outputs)
SEGMENTS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
            "gate_proj": ("gu", 0), "up_proj": ("gu", 1), "down_proj": ("down", 0)}


class LoraFw(ctypes.Structure):
    """csrc/lora.c's lora_fw: this forward's column weights (T x ld), or NULL."""
    _fields_ = [("w", ctypes.c_void_p), ("ld", ctypes.c_int64)]


class LoraPlan(ctypes.Structure):
    """csrc/lora.c's qmm_lora: one fused projection's side paths."""
    _fields_ = [("R", ctypes.c_int64), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("lo", ctypes.c_void_p),
                ("hi", ctypes.c_void_p), ("off", ctypes.c_void_p), ("fw", ctypes.c_void_p), ("col", ctypes.c_int64)]


@dataclass
class Projection:
    """A fused projection of one layer as native_model.py multiplies it."""
    opts: object  # its native.QmmOpts
    in_features: int
    segments: list[int]  # output rows of each fused module, in order


class NativeAdapters:
    """The bank's side paths attached to a model's projections (`projections[layer][name]`)."""

    def __init__(self, bank: AdapterBank, projections: list[dict[str, Projection]]):
        if bank.n_layers != len(projections):
            raise ValueError(f"the adapters are for {bank.n_layers} layers; this model has {len(projections)}")
        self.bank = bank
        self.fw = LoraFw(None, 0)
        grouped: dict[tuple[int, str], list] = {}
        for t in bank.targets.values():
            leaf = t.module.rsplit(".", 1)[-1]
            if leaf not in SEGMENTS or not 0 <= t.layer < len(projections):
                raise ValueError(f"the native runtime applies adapters to the q/k/v/o/gate/up/down projections "
                                 f"of the model's layers, not to {t.module}")
            name, seg = SEGMENTS[leaf]
            grouped.setdefault((t.layer, name), []).append((seg, t))
        self.plans, self.opts, self._keep = [], [], []
        slot_of, adapter_of, scale_of = [], [], []  # per column: its index in the weights' axes
        for (layer, name), targets in sorted(grouped.items()):
            proj = projections[layer][name]
            targets.sort(key=lambda st: st[0])  # q, k, v / gate, up: the projection's output order
            plan = self._plan(proj, targets, col=len(slot_of))
            for _, t in targets:
                slot_of += [t.slot] * len(t.adapter)
                adapter_of.append(t.adapter)
                scale_of.append(t.scale)
            self.plans.append(plan)
            self.opts.append(proj.opts)
        self.R = sum(len(a) for a in adapter_of)
        self.fw.ld = self.R
        self.slot_of = np.asarray(slot_of, dtype=np.int64)
        self.adapter_of = np.concatenate(adapter_of).astype(np.int64) if adapter_of else np.zeros(0, np.int64)
        self.scale_of = np.concatenate(scale_of).astype(np.float32) if scale_of else np.zeros(0, np.float32)

    def _plan(self, proj: Projection, targets: list, col: int) -> LoraPlan:
        starts = np.cumsum([0] + proj.segments)
        A, B, lo, hi = [], [], [], []
        for seg, t in targets:
            out = proj.segments[seg]
            if t.A.shape[1] != proj.in_features or t.B.shape[0] != out:
                raise ValueError(f"the adapter factors of {t.module} are {t.A.shape[1]} -> {t.B.shape[0]}; "
                                 f"the model's projection is {proj.in_features} -> {out}")
            A.append(t.A)
            B.append(np.ascontiguousarray(t.B.T).reshape(-1))  # column by column
            lo += [int(starts[seg])] * t.A.shape[0]
            hi += [int(starts[seg]) + out] * t.A.shape[0]
        a = np.ascontiguousarray(np.concatenate(A), dtype=np.float32)
        b = np.ascontiguousarray(np.concatenate(B), dtype=np.float32)
        lo_a, hi_a = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(hi_a - lo_a)[:-1]]).astype(np.int64)
        self._keep += [a, b, lo_a, hi_a, off]
        return LoraPlan(len(lo), a.ctypes.data, b.ctypes.data, lo_a.ctypes.data, hi_a.ctypes.data, off.ctypes.data,
                        ctypes.addressof(self.fw), col)

    def attach(self) -> None:
        for plan, opts in zip(self.plans, self.opts):
            opts.lora = ctypes.addressof(plan)

    def detach(self) -> None:
        for opts in self.opts:
            opts.lora = None

    def column_weights(self, weights: np.ndarray, T: int) -> np.ndarray:
        """(T, R) float32: every projection's column weights side by side (Target.column_weights)."""
        w = np.asarray(weights, dtype=np.float32)
        want = (self.bank.n_slots, T, len(self.bank.names))
        if w.shape != want:
            raise ValueError(f"adapter weights of shape {w.shape}; this forward needs {want} "
                             "(slots, rows, adapters)")
        cols = w[self.slot_of, :, self.adapter_of] * self.scale_of[:, None]  # (R, T)
        return np.ascontiguousarray(cols.T)

    def begin(self, weights: np.ndarray | None, T: int) -> None:
        """Point the side paths at this forward's weights (None: off) until end()."""
        self.fw.w, self._cols = None, None
        if weights is not None and self.R:
            self._cols = self.column_weights(weights, T)
            self.fw.w = self._cols.ctypes.data

    def end(self) -> None:
        self.fw.w, self._cols = None, None
