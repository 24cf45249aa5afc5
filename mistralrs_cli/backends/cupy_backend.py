"""The CUDA backend: the cuda/*.cu kernels launched through CuPy (the only module that imports cupy).

Kernels are fetched by name from one table keyed by quant type, and launched through a launcher
with CuPy's call shape, `launcher.get_function(name)(grid, block, args, shared_mem=)`. On a GPU
the launcher is CupyLauncher (RawModule, torch's current stream, DLPack views of torch tensors);
the tests pass the project's CPU emulator of CUDA instead, so this launch code is what they run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from ..errors import UserError
from ..quant.qweight import QWeight


def _cuda_dir() -> Path:
    """The kernels' source: mistralrs_cli/cuda/ in an installed wheel (pyproject.toml maps the
    top-level cuda/ there), the repository's cuda/ when run from a checkout or an editable install."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "cuda"
    return shipped if shipped.is_dir() else package.parent / "cuda"


CUDA_DIR = _cuda_dir()
GEMV_MAX_M = 8  # cuda/gemv.cu: activation rows one warp carries; more rows go to the tiled GEMM
GEMV_WARPS = 4
TILE = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchShape:
    block: tuple[int, int, int]
    grid: Callable[[int, int, int], tuple[int, ...]]  # (weight rows N, columns K, activation rows M)
    shared_mem: int = 0


# op -> how its kernels are launched (cuda/<op>.cu states the same shapes)
LAUNCH = {
    "dequantize": LaunchShape((256, 1, 1), lambda n, k, m: (n, _cdiv(k, 256))),
    "gemv": LaunchShape((32, GEMV_WARPS, 1), lambda n, k, m: (_cdiv(n, GEMV_WARPS),)),
    "gemm": LaunchShape((32, 8, 1), lambda n, k, m: (_cdiv(n, TILE), _cdiv(m, TILE)), 2 * TILE * (TILE + 1) * 4),
}
# quant type -> the <qtype> part of its kernels' names (cuda/quants.cuh FOR_EACH_FORMAT)
KERNEL_TAGS = {
    Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0",
    Q.Q5_1: "q5_1", Q.Q8_0: "q8_0", Q.Q2_K: "q2_k", Q.Q3_K: "q3_k", Q.Q4_K: "q4_k", Q.Q5_K: "q5_k",
    Q.Q6_K: "q6_k", Q.IQ4_NL: "iq4_nl", Q.IQ4_XS: "iq4_xs",
}
DTYPE_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def kernel_name(op: str, qtype: Q, dtype: torch.dtype = torch.float32) -> str:
    return f"{op}_{KERNEL_TAGS[qtype]}_{DTYPE_TAGS[dtype]}"


def kernel_source() -> str:
    """All cuda/*.cu as one module's code (quants.cuh comes in once, through -I cuda/)."""
    return "\n".join(f.read_text() for f in sorted(CUDA_DIR.glob("*.cu")))


def kernel_options() -> tuple[str, ...]:
    return (f"-I{CUDA_DIR}",)


@functools.lru_cache(maxsize=1)
def _cupy():
    import cupy  # optional: only a CUDA machine needs it

    return cupy


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether --device cuda can work here, and why not in one sentence.
    torch is asked first: on a machine without a GPU that answers without importing CuPy
    (~0.3 s at every start)."""
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU (no GPU, no driver, or a CPU-only torch build)"
    try:
        cupy = _cupy()
    except ImportError:
        return False, "CuPy is not installed (pip install cupy-cuda13x)"
    try:
        if not cupy.is_available():
            return False, "CuPy finds no usable CUDA GPU or driver"
    except Exception as e:  # broken driver installs raise instead of answering False
        return False, f"CUDA is not usable ({e})"
    if not torch.cuda.is_available():
        return False, "this torch build has no CUDA support"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def resolve_device(requested: str) -> tuple[str, str | None]:
    """--device cpu|cuda|auto -> (device, one-line notice or None). cuda with no GPU is an error."""
    if requested == "cpu":
        return "cpu", None
    ok, reason = cuda_status()
    if ok:
        return "cuda", None
    if requested == "cuda":
        raise UserError(f"--device cuda: {reason}; run with --device cpu (or --device auto).")
    return "cpu", f"no usable GPU ({reason}); running on the CPU"


class CupyLauncher:
    """CuPy's RawModule over cuda/*.cu; arrays are DLPack views of torch tensors (no copies)."""

    device = "cuda"

    def __init__(self, code: str | None = None, options: tuple[str, ...] | None = None):
        self.cupy = _cupy()
        self.module = self.cupy.RawModule(code=code or kernel_source(), options=options or kernel_options())

    def get_function(self, name: str):
        return self.module.get_function(name)

    def array(self, t: torch.Tensor):
        t = t.detach()
        # CuPy has no bfloat16 dtype: hand over the same bytes as int16 (kernels see a pointer)
        return self.cupy.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)

    def stream(self):
        """Launch on torch's current stream, so kernels order with torch's own work."""
        return self.cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


class CupyBackend:
    """Backend protocol (qmatmul, dequantize) on CUDA kernels; f32 accumulation throughout."""

    name = "cupy"

    def __init__(self, launcher=None):
        self.launcher = launcher if launcher is not None else CupyLauncher()
        self.device = torch.device(self.launcher.device)

    def _raw(self, w: QWeight) -> torch.Tensor:
        """The weight's blocks on the device, copied there once."""
        raw = w.cache.get("cupy")
        if raw is None:
            raw = w.cache["cupy"] = w.raw.to(self.device).contiguous()
        return raw

    def _launch(self, op: str, qtype: Q, dtype: torch.dtype, n: int, k: int, m: int, tensors, scalars) -> None:
        shape = LAUNCH[op]
        fn = self.launcher.get_function(kernel_name(op, qtype, dtype))
        args = tuple(self.launcher.array(t) for t in tensors) + tuple(np.int32(s) for s in scalars)
        with self.launcher.stream():
            fn(shape.grid(n, k, m), shape.block, args, shared_mem=shape.shared_mem)

    def supports(self, w: QWeight) -> bool:
        return all(p.qtype in KERNEL_TAGS for p in getattr(w, "parts", [w]))

    def qmatmul(self, x: torch.Tensor, w: QWeight) -> torch.Tensor:
        n_out, k = w.shape
        lead = x.shape[:-1]
        if not self.supports(w):  # IQ1/IQ2/IQ3 have no kernels yet: the reference dequantization
            return F.linear(x, self.dequantize(w, x.dtype).to(x.device))
        # under -n the placed layers hand us device tensors (backends/placement.py), so these
        # .to() calls move nothing; only a caller on another device pays a copy each way
        x2 = x.reshape(-1, k).to(self.device, torch.float32).contiguous()  # (M, K)
        m = x2.shape[0]
        y = torch.empty(m, n_out, dtype=torch.float32, device=self.device)  # (M, N)
        if m == 0:  # an empty grid is a launch error on CUDA
            return y.view(*lead, n_out).to(x.device, x.dtype)
        op = "gemv" if m <= GEMV_MAX_M else "gemm"
        col = 0
        for p in getattr(w, "parts", [w]):
            raw = self._raw(p)
            self._launch(op, p.qtype, torch.float32, p.shape[0], k, m, (raw, x2, y),
                         (p.shape[0], k, raw.shape[1], m, n_out, col))
            col += p.shape[0]
        return y.view(*lead, n_out).to(x.device, x.dtype)

    def dequantize(self, w: QWeight, dtype: torch.dtype) -> torch.Tensor:
        if not self.supports(w) or dtype not in DTYPE_TAGS:
            return w.dequantize(dtype).to(self.device)
        out = torch.empty(w.shape, dtype=dtype, device=self.device)
        row = 0
        for p in getattr(w, "parts", [w]):
            rows, cols = p.shape
            raw = self._raw(p)
            self._launch("dequantize", p.qtype, dtype, rows, cols, 0, (raw, out[row:row + rows]),
                         (rows, cols, raw.shape[1]))
            row += rows
        return out

    # the loader's hooks (loaders/weights.py): any QLinears may share one multiply here
    def can_fuse(self, linears: list) -> bool:
        return all(lin.backend is self for lin in linears)

    def prepare_for(self, w: QWeight, x_dtype: torch.dtype) -> None:
        for p in getattr(w, "parts", [w]):
            self._raw(p)


def use_backend(model: torch.nn.Module, backend) -> int:
    """Point every quantized linear of a loaded model (QLinear, FusedQLinear) at `backend`;
    returns how many. The narrow hook: loaders build with the torch backend, this swaps after."""
    count = 0
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "backend"):
            module.backend = backend
            count += 1
    return count
