"""Shared by the CUDA tests: random GGUF blocks for any kernel type, and the emulator launcher
over the project's own cuda/*.cu (built once per session)."""
from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.quant.qweight import QWeight

from .launcher import SCHEDULES, EmuLauncher

# Byte offsets of the fp16 scale fields per block: random bytes there could be inf or NaN.
F16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
    Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def random_qweight(qtype: Q, rows: int, cols: int, seed: int = 0) -> QWeight:
    """Random block bytes with small finite scales (and finite values for the float types)."""
    rng = np.random.default_rng(seed)
    if qtype in _FLOATS:
        vals = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)).to(_FLOATS[qtype])
        return QWeight(vals.view(torch.uint8).reshape(rows, -1).clone(), qtype, (rows, cols))
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(raw.shape[0]) * 0.02).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return QWeight(torch.from_numpy(raw.reshape(rows, -1)), qtype, (rows, cols))


@functools.lru_cache(maxsize=None)
def emu_launcher(schedules: tuple[str, ...] = SCHEDULES, variant: str = "O2") -> EmuLauncher:
    """The emulator over exactly the code and options CupyLauncher hands to cupy.RawModule."""
    return EmuLauncher(cb.kernel_source(), cb.kernel_options(), schedules=schedules, variant=variant)
