"""The torch backend: the reference and the CPU path.

A quantized weight is prepared once into a dense compute form (cached on the QWeight), because
dequantizing every block on every token costs more than the multiply itself on a CPU.

Numerics (the --numerics values; "int4" is the experimental path described at int4_form):
- "exact": the dequantized weights times the activations, in the activations' dtype.
- "precise" (the default): the native kernels on the weights' own blocks, activations rounded in
  two 8-bit parts (~16 bits); where no native kernel serves a weight, the exact path.
- "fast": first round the activations into 8-bit blocks before the integer dot products (blocks
  of 32 with an fp16 scale for the legacy types, of 256 with an f32 scale for the K types), the
  rounding llama.cpp's CPU kernels use; f16 weights where no native kernel serves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from ..quant import int4pack
from . import native
from ..quant.dequant import dequantize
from ..quant.qweight import QWeight


def _q8_blocks(x: torch.Tensor, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Round to 8-bit blocks with scale max|x|/127 stored as fp16 (llama.cpp's q8_0 / q8_1).
    In f16 the product code * scale rounds once, as the f32 product would when narrowed."""
    xb = x.reshape(-1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = (xb * (127.0 / amax.clamp_min(1e-30))).round_()
    d = (amax / 127.0).half()
    if dtype == torch.float16:
        return (q.half() * d).view(x.shape)
    return (q * d.float()).view(x.shape).to(dtype)


def _q8_k(x: torch.Tensor, block: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """llama.cpp's q8_K: scale -max/127 from the signed largest value, f32, codes capped at 127."""
    xb = x.reshape(-1, block)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    iscale = -127.0 / torch.where(mx == 0, torch.ones_like(mx), mx)
    q = (xb * iscale).round_().clamp_(max=127)
    return torch.where(mx == 0, torch.zeros_like(xb), q / iscale).view(x.shape).to(dtype)


def _q8_0(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _q8_blocks(x, 32, dtype)


def _f16(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.half().to(dtype)


# weight type -> how llama.cpp's CPU path rounds the activations it multiplies with
ACTIVATION_ROUNDING = {
    **dict.fromkeys([Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL], _q8_0),
    **dict.fromkeys([Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS], _q8_k),
    Q.F16: _f16,
}


SMALL_M = 8


class TorchBackend:
    name = "torch"

    def __init__(self, numerics: str = "precise"):
        self.numerics = numerics
        self._opts = native.qmm_opts(precise=numerics == "precise")
        self._last: tuple | None = None  # (x, rounding, rounded x): q/k/v and gate/up share inputs

    def dequantize(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        return w.dequantize(dtype)

    def prepare(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        dense = w.cache.get(dtype)
        if dense is None:
            dense = w.cache[dtype] = self._dense(w, dtype)
        return dense

    @staticmethod
    def _dense(w: QWeight, dtype: torch.dtype, chunk: int = 4096) -> torch.Tensor:
        """Dequantize in row chunks, so a large table never exists in f32 all at once."""
        parts = getattr(w, "parts", [w])
        out = torch.empty(w.shape, dtype=dtype)
        row = 0
        for p in parts:
            for i in range(0, p.shape[0], chunk):
                rows = p.raw[i:i + chunk]
                out[row:row + rows.shape[0]] = dequantize(rows, p.qtype, torch.float32)
                row += rows.shape[0]
        return out

    def can_fuse(self, linears: list) -> bool:
        """Fusable when the activations would be rounded the same way for every part."""
        rounding = {ACTIVATION_ROUNDING.get(lin.qweight.qtype) for lin in linears}
        backends = {id(lin.backend) for lin in linears}
        return len(rounding) == 1 and backends == {id(self)}

    def round_activations(self, x: torch.Tensor, w: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x rounded as the fast path's kernels round it for w's dot products, in `dtype`."""
        rounding = ACTIVATION_ROUNDING.get(w.qtype)
        if self.numerics != "fast" or rounding is None or x.dtype != torch.float32:
            return x.to(dtype)
        last = self._last
        if last is not None and last[0] is x and last[1] is rounding and last[2] == dtype:
            return last[3]
        xr = rounding(x, dtype=dtype)
        self._last = (x, rounding, dtype, xr)
        return xr

    def native_ok(self, w: QWeight) -> bool:
        """fast or precise numerics and types the native kernels know: multiply the blocks
        directly (integer dot products, weights never leave their 4.5-8.5 bit form)."""
        ok = w.cache.get("native")
        if ok is None:
            parts = getattr(w, "parts", [w])
            ok = w.cache["native"] = (
                self.numerics in ("fast", "precise") and all(
                    p.qtype in native.TYPES and p.shape[1] % (256 if p.qtype in native.K_TYPES else 32) == 0
                    for p in parts)
                and native.library() is not None)
        return ok

    @staticmethod
    def native_parts(w: QWeight) -> "native.Plan":
        """The kernel's view of w's blocks, read in place from the file mapping."""
        plan = w.cache.get("native_parts")
        if plan is None:
            plan = w.cache["native_parts"] = native.Plan([(p.raw, p.qtype, p.shape[0]) for p in getattr(w, "parts", [w])])
        return plan

    def prepare_for(self, w: QWeight, x_dtype: torch.dtype) -> None:
        """Build the compute form qmatmul will use for activations of `x_dtype`."""
        if x_dtype == torch.float32 and self.native_ok(w):
            self.native_parts(w)
            return
        if x_dtype == torch.float32 and self.int4_form(w) is not None:
            return
        self.prepare(w, self.weight_dtype(x_dtype))

    def weight_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.float16 if x_dtype == torch.float32 and self.numerics in ("fast", "int4") else x_dtype

    def int4_form(self, w: QWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
        """numerics="int4" only (not a --numerics value): Q4_0/Q4_1/Q4_K as torch's packed int4
        CPU weights (4 bits in memory, about 2x faster GEMVs than f16) with bf16 activations,
        whose rounding is coarser than "fast"'s. None when the weight (or a part of a group)
        cannot go there."""
        if "int4" not in w.cache:
            parts = getattr(w, "parts", [w])
            ok = self.numerics == "int4" and all(int4pack.supported(p.qtype, p.shape) for p in parts)
            w.cache["int4"] = int4pack.pack([(p.raw, p.qtype) for p in parts], w.shape[1]) if ok else None
        return w.cache["int4"]

    def qmatmul(self, x: torch.Tensor, w: QWeight) -> torch.Tensor:
        if x.dtype == torch.float32 and self.native_ok(w):
            y = native.qmatmul(x.reshape(-1, w.shape[1]), self.native_parts(w), opts=self._opts)
            return y.view(*x.shape[:-1], w.shape[0])
        if x.dtype == torch.float32 and (form := self.int4_form(w)) is not None:
            return int4pack.matmul(x, *form)
        if self.weight_dtype(x.dtype) == x.dtype:
            return F.linear(self.round_activations(x, w, x.dtype), self.prepare(w, x.dtype))
        # f32 activations on the CPU: weights kept as f16 (half the bytes of f32, and decode is
        # bound by reading them); a few rows multiply in f16 (f32 accumulation inside), a
        # prefill chunk widens the weight to f32 first (CPU f16 GEMMs are slow).
        w16 = self.prepare(w, torch.float16)
        if x.shape[0] <= SMALL_M:
            return F.linear(self.round_activations(x, w, torch.float16), w16).float()
        return F.linear(self.round_activations(x, w), w16.float())
