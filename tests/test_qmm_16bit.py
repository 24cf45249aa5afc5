"""Precise rows against 16-bit activations for the packed 4-, 5- and 6-bit types (csrc/packed.c's
packed_rows_w, packed_k_rows_w): the path of builds without VNNI (an AVX2 machine's, and the
scalar one; a VNNI build keeps the two 8-bit parts and must give their bits) for the types of both real models (SmolLM2: Q4_1; Gemma-3: Q5_0, Q4_K, Q6_K) and
Q4_0. tests/test_qmm_q8_16.py covers Q8_0.

- precise: each row rounded once to 16-bit codes per 16 values instead of two 8-bit parts (a
  build with -DWIDE_Q8=0 keeps the two parts: the reference), at least as close to the product
  of the dequantized weights (gguf-py) and the unrounded activations, in f64.
- fast rows of these types keep the 8-bit tiles: the same bits as the -DWIDE_Q8=0 build.
- each activation row's outputs are the same whatever rows share the call, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

import gguf_builder as gb
from mistralrs_cli.backends import native

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K]


@pytest.fixture(scope="module")
def narrow_builds(kernel_builds, tmp_path_factory):
    """The native and scalar builds without the 16-bit path (two-part precise rows)."""
    d = tmp_path_factory.mktemp("narrow16")
    return {"native": native.build(("-DWIDE_Q8=0",), d),
            "scalar": native.build(("-mno-avx2", "-mno-avx512f", "-DWIDE_Q8=0"), d)}


def _weights(qtype: Q, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if qtype in gb.QUANTIZABLE:
        w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
        raw = quants.quantize(w, qtype).copy()
    else:
        raw = gb.random_blocks((n, k), qtype, seed=seed)
    return raw, quants.dequantize(raw, qtype).astype(np.float64)


def _activations(rng, m: int, k: int) -> np.ndarray:
    """Gaussian rows with a few large outliers (as a decoder's hidden states have)."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.integers(0, k, 4)] *= 40
    return x


def test_library_reports_the_16bit_types(kernel_builds, narrow_builds):
    for qtype in TYPES + [Q.Q8_0]:
        assert kernel_builds["avx2"].packed_wide_precise(int(qtype)) == 1
        assert kernel_builds["scalar"].packed_wide_precise(int(qtype)) == 1
        assert narrow_builds["native"].packed_wide_precise(int(qtype)) == 0
    assert not kernel_builds["avx2"].packed_wide_precise(int(Q.Q5_1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_precise_is_at_least_as_close_as_two_parts(kernel_builds, narrow_builds, qtype):
    k, n = 512, 40
    raw, w = _weights(qtype, n, k, seed=3)
    x = _activations(np.random.default_rng(4), 64, k)
    ref = x.astype(np.float64) @ w.T
    opts = native.qmm_opts(precise=True)
    err = {"two parts": native.qmatmul(x, [(raw, qtype, n)], narrow_builds["native"], opts) - ref}
    for name, lib in kernel_builds.items():
        err[name] = native.qmatmul(x, [(raw, qtype, n)], lib, opts) - ref
    scale = np.abs(ref).max()
    rms = {name: float(np.sqrt((e * e).mean())) / scale for name, e in err.items()}
    worst = {name: float(np.abs(e).max()) / scale for name, e in err.items()}
    print(f"precise {qtype.name} rms / max |err| (relative to max |ref|): {rms} / {worst}")
    for name, lib in kernel_builds.items():
        if not lib.packed_wide_precise(int(qtype)):  # a VNNI build keeps the two parts: the reference
            assert np.array_equal(err[name], err["two parts"]), name
            continue
        assert rms[name] <= rms["two parts"], rms
        assert worst[name] <= 1.2 * worst["two parts"], worst
        assert worst[name] < 1e-4, worst  # as test_qmm_types.py's precise bar


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fast_keeps_the_8bit_tiles(kernel_builds, narrow_builds, qtype):
    k, n = 512, 21
    raw, _ = _weights(qtype, n, k, seed=5)
    x = _activations(np.random.default_rng(6), 9, k)
    for name, lib in kernel_builds.items():
        want = native.qmatmul(x, [(raw, qtype, n)], narrow_builds["scalar" if name == "scalar" else "native"])
        assert np.array_equal(native.qmatmul(x, [(raw, qtype, n)], lib), want), name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_their_neighbours(kernel_builds, qtype):
    """Rows alone, in pairs and in the whole batch (tiles of 4, 2 and 1 rows): the same bits."""
    k, n = 512, 21
    raw, _ = _weights(qtype, n, k, seed=7)
    x = _activations(np.random.default_rng(8), 11, k)
    opts = native.qmm_opts(precise=True)
    for name, lib in kernel_builds.items():
        plan = native.Plan([(raw, qtype, n)], lib)
        whole = native.qmatmul(x, plan, lib, opts)
        for i in range(11):
            assert np.array_equal(native.qmatmul(x[i:i + 1], plan, lib, opts), whole[i:i + 1]), (name, i)
        assert np.array_equal(native.qmatmul(x[3:9], plan, lib, opts), whole[3:9]), name


def test_a_fused_call_of_several_types(kernel_builds):
    """Gemma-3's mix in one call (16-bit parts beside a two-part Q5_1 part): each part's columns
    as alone, also with a bias and a residual add."""
    k = 512
    parts = [(_weights(t, r, k, seed=s)[0], t, r)
             for t, r, s in [(Q.Q5_0, 24, 1), (Q.Q4_K, 16, 2), (Q.Q5_1, 8, 3), (Q.Q6_K, 13, 4), (Q.Q4_1, 9, 5)]]
    n = sum(p[2] for p in parts)
    rng = np.random.default_rng(9)
    x = _activations(rng, 6, k)
    bias = rng.standard_normal(n).astype(np.float32)
    opts = native.qmm_opts(precise=True)
    for name, lib in kernel_builds.items():
        plans = [native.Plan([p], lib) for p in parts]
        whole = native.qmatmul(x, native.Plan.join(plans), lib, opts)
        alone = np.concatenate([native.qmatmul(x, p, lib, opts) for p in plans], 1)
        assert np.array_equal(whole, alone), name
        res = np.zeros((6, n), np.float32)
        with_res = native.qmm_opts(bias=bias, precise=True)
        with_res.residual, with_res.ld_res = res.ctypes.data, n
        native.qmatmul(x, native.Plan.join(plans), lib, with_res)
        assert np.array_equal(res, alone + bias), name
