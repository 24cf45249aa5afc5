"""An AdapterBank (adapters/bank.py) laid onto the native runtime's fused projections.

native_model.py multiplies q|k|v as one weight, gate|up as one, then o and down. Each of those
four projections of a layer gets one csrc/lora.c `qmm_lora`: the A rows of every Target that
feeds it stacked (R x in), B as blocks (one adapter's columns of one module) that write the
output span of their own module only (q_proj's columns the q rows, up_proj's the up half), and
per column its (slot, adapter) pair and scale. A forward's adapter weights (slots, T, adapters)
hang off one shared `lora_fw` as (T, slots x adapters); C forms a column's weight as
Target.column_weights does. Without adapter weights its pointer is NULL and qmm_parts runs
exactly as without a bank. The rows a projection sees are its own (after the fused norm / gated
activation), so the side path is y += scale * B (A x) with x what the base weight multiplies,
before any bias-free post-norm and residual add, as bank.py asks. The factors are stored as f16
after exact power-of-two scaling (see csrc/lora.c).
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
    """csrc/lora.c's lora_fw: this forward's adapter weights as (T, slots x adapters), or NULL."""
    _fields_ = [("w", ctypes.c_void_p), ("ld", ctypes.c_int64)]


class LoraPlan(ctypes.Structure):
    """csrc/lora.c's qmm_lora: one fused projection's side paths."""
    _fields_ = [("R", ctypes.c_int64), ("A", ctypes.c_void_p), ("nblk", ctypes.c_int64), ("blk", ctypes.c_void_p),
                ("B", ctypes.c_void_p), ("fw", ctypes.c_void_p), ("pair", ctypes.c_void_p), ("scale", ctypes.c_void_p)]


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
        for (layer, name), targets in sorted(grouped.items()):
            proj = projections[layer][name]
            targets.sort(key=lambda st: st[0])  # q, k, v / gate, up: the projection's output order
            self.plans.append(self._plan(proj, targets))
            self.opts.append(proj.opts)
        self.fw.ld = bank.n_slots * len(bank.names)

    @classmethod
    def on_model(cls, bank: AdapterBank, model) -> "NativeAdapters":
        """Attached to a NativeModel's fused projections (q|k|v, o, gate|up, down of each layer)."""
        d, q, kv = model.config.hidden_size, model.nq * model.hd, model.nkv * model.hd
        inter = model.gate_up_rows // 2
        out = cls(bank, [{"qkv": Projection(L.qkv_opts, d, [q, kv, kv]), "o": Projection(L.o_opts, q, [d]),
                          "gu": Projection(L.gate_up_opts, d, [inter, inter]),
                          "down": Projection(L.down_opts, inter, [d])} for L in model.layers])
        out.attach()
        return out

    def _plan(self, proj: Projection, targets: list) -> LoraPlan:
        """The projection's qmm_lora: columns adapter by adapter (an adapter's factors for the
        whole projection lie together, so a forward using one of several reads one stretch), each
        with its (slot, adapter) pair and its scale divided by the powers of two its f16 factors
        were scaled by (A's row times B's column: exact)."""
        starts = np.cumsum([0] + proj.segments)
        blocks = []  # (adapter, segment, target, its columns): one adapter's columns of one module
        for seg, t in targets:
            if t.A.shape[1] != proj.in_features or t.B.shape[0] != proj.segments[seg]:
                raise ValueError(f"the adapter factors of {t.module} are {t.A.shape[1]} -> {t.B.shape[0]}; "
                                 f"the model's projection is {proj.in_features} -> {proj.segments[seg]}")
            blocks += [(a, seg, t, np.flatnonzero(t.adapter == a)) for a in dict.fromkeys(t.adapter.tolist())]
        blocks.sort(key=lambda b: (b[0], b[1]))
        A, tiles, blk, pairs, scales, eb, c, off = [], [], [], [], [], [], 0, 0
        for a, seg, t, cols in blocks:
            A.append(t.A[cols])
            b_scaled, e = _to_half_range(t.B[:, cols].T)  # per column of B
            tiles.append(_tiles(b_scaled.T))
            blk.append([c, c + len(cols), starts[seg], starts[seg] + proj.segments[seg], off])
            pairs.append(t.slot * len(self.bank.names) + t.adapter[cols].astype(np.int64))
            scales.append(t.scale[cols])
            eb.append(e)
            c, off = c + len(cols), off + tiles[-1].size
        a16, ea = _to_half_range(np.concatenate(A))
        a16 = np.ascontiguousarray(a16.astype(np.float16))
        b16 = np.ascontiguousarray(np.concatenate(tiles).astype(np.float16))
        blk_a = np.asarray(blk, dtype=np.int64).reshape(-1)
        fold = np.ldexp(np.float32(1.0), -(ea + np.concatenate(eb))).astype(np.float32)
        pair = np.ascontiguousarray(np.concatenate(pairs), dtype=np.int64)
        scale = np.ascontiguousarray(np.concatenate(scales) * fold, dtype=np.float32)
        self._keep += [a16, b16, blk_a, pair, scale]
        return LoraPlan(c, a16.ctypes.data, len(blk), blk_a.ctypes.data, b16.ctypes.data, ctypes.addressof(self.fw),
                        pair.ctypes.data, scale.ctypes.data)

    def attach(self) -> None:
        for plan, opts in zip(self.plans, self.opts):
            opts.lora = ctypes.addressof(plan)

    def detach(self) -> None:
        for opts in self.opts:
            opts.lora = None

    def begin(self, weights: np.ndarray | None, T: int) -> None:
        """Point the side paths at this forward's weights (None: off) until end(); C reads a
        column's weight as w[slot, row, adapter] * scale (Target.column_weights)."""
        self.fw.w, self._w = None, None
        if weights is None or not self.plans:
            return
        w = np.asarray(weights, dtype=np.float32)
        want = (self.bank.n_slots, T, len(self.bank.names))
        if w.shape != want:
            raise ValueError(f"adapter weights of shape {w.shape}; this forward needs {want} "
                             "(slots, rows, adapters)")
        self._w = np.ascontiguousarray(w.transpose(1, 0, 2)).reshape(T, -1)
        self.fw.w = self._w.ctypes.data

    def end(self) -> None:
        self.fw.w, self._w = None, None


def _tiles(B: np.ndarray) -> np.ndarray:
    """B (out, r) as csrc/lora.c reads it: tiles of 8 outputs, [tile][column][8] (zeros past out)."""
    out, r = B.shape
    padded = np.zeros(((out + 7) // 8 * 8, r), dtype=np.float32)
    padded[:out] = B
    return np.ascontiguousarray(padded.reshape(-1, 8, r).transpose(0, 2, 1)).reshape(-1)


def _to_half_range(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows * 2^e per row (f32, exact), e putting each row's largest |value| in [2^14, 2^15): in
    f16's normal range with room, so rounding to f16 keeps 11 significant bits of every value down
    to 2^-28 of the row's largest (smaller ones lose bits as f16 subnormals)."""
    rows = np.asarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)
    e = np.where(peak > 0, 15 - np.frexp(peak)[1], 0).astype(np.int64)
    return np.ldexp(rows, e[:, None].astype(np.int32)).astype(np.float32), e
