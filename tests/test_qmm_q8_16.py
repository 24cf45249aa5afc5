"""Packed Q8_0 against 16-bit activations (csrc/packed.c's packed_rows_w): the path of builds
without VNNI (this AVX2 machine's, and the scalar one). Both real models' output matrix is Q8_0.

- fast: the 8-bit codes widened to int16 give the same integer sums as the 8-bit tiles, and the
  same f32 steps lane by lane, so the outputs are the 8-bit tiles' bit for bit (a build with
  -DWIDE_Q8=0 keeps those tiles: the reference here).
- precise: each row rounded once to 16-bit codes per 16 values (scale amax / 32767, f32)
  instead of two 8-bit parts: at least as close to the unrounded product.
- a Q8_0 part fused with other types' parts in one call: each part's columns as alone, in both
  roundings, with the epilogue (bias, residual) over all of them.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

import gguf_builder as gb
from mistralrs_cli.backends import native

MS = [1, 2, 3, 4, 5, 8, 9, 17]
ROWS = [5, 8, 16, 21, 40]


@pytest.fixture(scope="module")
def narrow_builds(kernel_builds, tmp_path_factory):
    """The native and scalar builds with the 8-bit Q8_0 tiles (two-part precise rows), as before
    the 16-bit path."""
    d = tmp_path_factory.mktemp("narrow")
    return {"native": native.build(("-DWIDE_Q8=0",), d),
            "scalar": native.build(("-mno-avx2", "-mno-avx512f", "-DWIDE_Q8=0"), d)}


@pytest.fixture(scope="module")
def narrow(narrow_builds):
    return narrow_builds["native"]


def _q8_0(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
    raw = quants.quantize(w, Q.Q8_0).copy()
    return raw, quants.dequantize(raw, Q.Q8_0).astype(np.float64)


def _activations(rng, m: int, k: int) -> np.ndarray:
    """Gaussian rows with a few large outliers (as a decoder's hidden states have)."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.integers(0, k, 4)] *= 40
    return x


def test_library_reports_the_wide_path(kernel_builds, narrow):
    assert kernel_builds["avx2"].packed_wide(int(Q.Q8_0)) == 1
    assert kernel_builds["scalar"].packed_wide(int(Q.Q8_0)) == 1
    assert narrow.packed_wide(int(Q.Q8_0)) == 0
    assert not kernel_builds["avx2"].packed_wide(int(Q.Q4_0))


@pytest.mark.parametrize("n", ROWS)
def test_fast_gives_the_8bit_tiles_bits(kernel_builds, narrow_builds, n):
    """(The scalar build's f32 steps may be compiled apart from the vector ones: it is compared
    with the scalar 8-bit path.)"""
    k = 512
    raw, _ = _q8_0(n, k, seed=n)
    rng = np.random.default_rng(n)
    for m in MS:
        x = _activations(rng, m, k)
        for name, lib in kernel_builds.items():
            want = native.qmatmul(x, [(raw, Q.Q8_0, n)], narrow_builds["scalar" if name == "scalar" else "native"])
            got = native.qmatmul(x, [(raw, Q.Q8_0, n)], lib)
            assert np.array_equal(got, want), (name, m, np.abs(got - want).max())


def test_precise_is_at_least_as_close_as_two_parts(kernel_builds, narrow):
    k, n = 640, 40
    raw, w = _q8_0(n, k, seed=3)
    rng = np.random.default_rng(4)
    x = _activations(rng, 64, k)
    ref = x.astype(np.float64) @ w.T
    opts = native.qmm_opts(precise=True)
    err = {"two parts": native.qmatmul(x, [(raw, Q.Q8_0, n)], narrow, opts) - ref}
    for name, lib in kernel_builds.items():
        err[name] = native.qmatmul(x, [(raw, Q.Q8_0, n)], lib, opts) - ref
    rms = {name: float(np.sqrt((e * e).mean())) / np.abs(ref).max() for name, e in err.items()}
    worst = {name: float(np.abs(e).max()) / np.abs(ref).max() for name, e in err.items()}
    print(f"precise Q8_0 rms / max |err| (relative to max |ref|): {rms} / {worst}")
    for name in kernel_builds:
        assert rms[name] <= rms["two parts"], rms
        assert worst[name] <= 1.2 * worst["two parts"], worst
        assert worst[name] < 1e-4, worst  # as test_qmm_types.py's precise bar


@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
def test_a_q8_0_part_beside_other_types(kernel_builds, precise):
    """Fused matrices: the 16-bit part's columns go straight to y, the others through the two
    parts' sum; each part's columns equal the part alone, also with a bias and a residual add."""
    k = 512
    parts = [(_q8_0(21, k, seed=1)[0], Q.Q8_0, 21),
             (quants.quantize((np.random.default_rng(2).standard_normal((24, k)) * 0.1).astype(np.float32),
                              Q.Q4_1).copy(), Q.Q4_1, 24),
             (gb.random_blocks((16, k), Q.Q6_K, seed=3), Q.Q6_K, 16),
             (_q8_0(8, k, seed=4)[0], Q.Q8_0, 8)]
    n = sum(p[2] for p in parts)
    rng = np.random.default_rng(5)
    x = _activations(rng, 9, k)
    bias = rng.standard_normal(n).astype(np.float32)
    for name, lib in kernel_builds.items():
        plans = [native.Plan([p], lib) for p in parts]
        whole = native.qmatmul(x, native.Plan.join(plans), lib, native.qmm_opts(precise=precise))
        alone = np.concatenate([native.qmatmul(x, p, lib, native.qmm_opts(precise=precise)) for p in plans], 1)
        assert np.array_equal(whole, alone), name
        res = np.zeros((9, n), np.float32)
        opts = native.qmm_opts(bias=bias, precise=precise)
        opts.residual, opts.ld_res = res.ctypes.data, n
        native.qmatmul(x, native.Plan.join(plans), lib, opts)
        assert np.array_equal(res, alone + bias), name
        rows = np.concatenate([native.qmatmul(x[i:i + 1], native.Plan.join(plans), lib,
                                              native.qmm_opts(precise=precise)) for i in range(9)])
        assert np.array_equal(rows, whole), name
