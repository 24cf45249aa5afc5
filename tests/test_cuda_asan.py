"""One pass of every CUDA kernel under ASan/UBSan, in a separate process with libasan preloaded
(NVRTC breaks with ASan preloaded, so that process must never import cupy: the CuPy backend
imports it lazily, and the emulator launcher never asks for it). A broken kernel that reads past
the end of its input must make the same kind of process fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

ALL_KERNELS = r"""
import sys
import torch
from cuda_emu.fixtures import emu_launcher, random_qweight
from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.quant.dequant import block_size

be = cb.CupyBackend(emu_launcher(("shuffled",), "asan"))
for q in cb.KERNEL_TAGS:
    w = random_qweight(q, 5, {1: 77, 32: 64, 256: 256}[block_size(q)])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(be.dequantize(w, dtype), w.dequantize(dtype)), (q, dtype)
    dense = w.dequantize().double()
    for m in (2, 33):
        x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m)).double()
        err = (be.qmatmul(x.float(), w).double() - x @ dense.T).abs()
        assert (err <= 1e-5 * (x.abs() @ dense.abs().T)).all(), (q, m)  # f32 rounding scale
assert "cupy" not in sys.modules, "cupy was imported in the ASan process"
print("all kernels clean")
"""

READ_PAST_END = r"""
import numpy as np
from cuda_emu import EmuModule
code = 'extern "C" __global__ void shift(const float* x, float* y, int n) {' \
       '  const int i = threadIdx.x; if (i < n) y[i] = x[i + 1]; }'
x = np.ones(64, np.float32)
EmuModule(code, variant="asan").get_function("shift")((1,), (64,), (x, np.zeros_like(x), np.int32(64)))
print("not caught")
"""


def _asan_process(script: str) -> subprocess.Popen:
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("g++ has no libasan here")
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_asan_ubsan_pass_and_catch():
    good, bad = _asan_process(ALL_KERNELS), _asan_process(READ_PAST_END)
    out, err = good.communicate(timeout=300)
    assert good.returncode == 0 and "all kernels clean" in out, f"exit {good.returncode}\n{out[-1000:]}\n{err[-3000:]}"
    out, err = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "not caught" not in out
    assert "heap-buffer-overflow" in err, err[-3000:]
