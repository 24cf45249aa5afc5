"""csrc/quantize.c (--isq's Q8_0, Q4_K, Q5_K, Q6_K in C) against llama.cpp's own quantizers.

libggml-base's quantize_row_*_ref (tests/ggml_reference.py builds it) is the independent
reference: the C bytes must equal it for every block, on random rows and on adversarial ones
(zeros, constants, one-signed, huge and tiny magnitudes; no NaN or inf, which ggml's searches
do not define). The torch quantizers (the fallback without a compiler) are held to the same bytes
on the rows where they match ggml, and the C path must not depend on the thread count or build.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ggml_reference import ggml_library
from mistralrs_cli.backends import native
from mistralrs_cli.quant.dequant import row_bytes
from mistralrs_cli.quant.quantize import NATIVE_TYPES, quantize

TYPES = [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FMAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def lib():
    so = native.library()
    if so is None:
        pytest.skip("no C compiler: the native kernels are optional (torch quantizes instead)")
    return so


def adversarial(n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((40, n_cols)).astype(np.float32)
    w[1] = 0
    w[2] *= 1e-30                          # tiny but normal
    w[3] *= 1e30
    w[4] = 3e37 * rng.uniform(-1, 1, n_cols)  # large, with room for the searches' sums
    w[5, :256] = 0.5                       # a constant super-block
    w[6] = 0.25                            # a constant row
    w[7, : n_cols // 2] = 0
    w[8], w[9] = np.abs(w[8]), -np.abs(w[9])  # one-signed (min > 0, max < 0)
    w[10] = np.round(w[10] * 4) / 4        # few levels: exact ties in the searches
    w[11] = rng.integers(-8, 8, n_cols)    # integers
    w[12, ::7] = 100.0                     # spikes
    w[13] *= 1e-3
    w[14] = 1e-38 * rng.standard_normal(n_cols)  # near the smallest normal
    w[15, 1::2] = 0
    return w


def ggml_bytes(w: np.ndarray, qtype) -> np.ndarray:
    fn = getattr(ggml_library(), f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    want = np.zeros((w.shape[0], row_bytes(qtype, w.shape[1])), np.uint8)
    fn(w.ctypes.data, want.ctypes.data, w.size)
    return want


def c_bytes(so, w: np.ndarray, qtype, threads: int = 1) -> np.ndarray:
    out = np.zeros((w.shape[0], row_bytes(qtype, w.shape[1])), np.uint8)
    assert so.quantize_rows(int(qtype), w.ctypes.data, w.shape[0], w.shape[1], out.ctypes.data, threads) == 0
    return out


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_equals_llama_cpp(lib, qtype, seed):
    w = adversarial(1024, seed)
    np.testing.assert_array_equal(c_bytes(lib, w, qtype), ggml_bytes(w, qtype))
    # through quantize() (chunked, all threads) the same
    got = quantize(torch.from_numpy(w), qtype).numpy()
    np.testing.assert_array_equal(got, ggml_bytes(w, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_c_equals_torch_fallback(lib, qtype):
    """The torch quantizers give the C's (and ggml's) bytes on every row of these but the
    extremes: on rows near 1e30+ (Q6_K) and 1e-38 (Q4_K, Q5_K) torch's vectorized arithmetic
    rounds differently from C's, and only the C matches ggml there (test_c_equals_llama_cpp)."""
    w = adversarial(512, 5)
    keep = [i for i in range(w.shape[0]) if i not in (3, 4, 14)]
    w = np.ascontiguousarray(w[keep])
    torch.set_num_threads(1)
    ours = quantize(torch.from_numpy(w), qtype, native=False).numpy()
    np.testing.assert_array_equal(c_bytes(lib, w, qtype), ours)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_threads_and_builds_agree(kernel_builds, qtype):
    """2 threads, the 256-bit and the portable build: the same bytes (no FMA anywhere)."""
    w = adversarial(2048, 3)
    want = ggml_bytes(w, qtype)
    for name, so in kernel_builds.items():
        for threads in (1, 2):
            np.testing.assert_array_equal(c_bytes(so, w, qtype, threads), want, err_msg=f"{name} x{threads}")


def test_bf16_input_and_shapes(lib):
    w = torch.randn(3, 5, 512).bfloat16()
    got = quantize(w, Q.Q4_K)
    assert got.shape == (3, 5, row_bytes(Q.Q4_K, 512)) and got.dtype == torch.uint8
    want = ggml_bytes(w.float().reshape(-1, 512).numpy(), Q.Q4_K)
    np.testing.assert_array_equal(got.reshape(-1, want.shape[1]).numpy(), want)


def test_unsupported_is_refused(lib):
    w = np.ones((2, 256), np.float32)
    out = np.zeros(1024, np.uint8)
    assert lib.quantize_rows(int(Q.Q4_0), w.ctypes.data, 2, 256, out.ctypes.data, 1) == -1
    assert lib.quantize_rows(int(Q.Q4_K), w.ctypes.data, 1, 100, out.ctypes.data, 1) == -1
    assert Q.Q4_0 not in NATIVE_TYPES  # quantize() sends it to torch


def test_without_the_library_torch_quantizes(monkeypatch):
    """No compiler: quantize() falls back to the torch ports (ggml's bytes on >= 99% of blocks)."""
    monkeypatch.setattr(native, "library", lambda: None)
    w = np.random.default_rng(9).standard_normal((16, 1024)).astype(np.float32)
    for qtype in TYPES:
        got, want = quantize(torch.from_numpy(w), qtype).numpy(), ggml_bytes(w, qtype)
        nbytes = row_bytes(qtype, 256 if qtype != Q.Q8_0 else 32)
        assert (got.reshape(-1, nbytes) == want.reshape(-1, nbytes)).all(1).mean() >= 0.99
