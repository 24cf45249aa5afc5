"""The native CPU kernels (backends/csrc/qmatmul.c) against an independent reference: gguf-py
quantizes the weights and the activations (llama.cpp's reference q8_0), numpy does the
dot products. The AVX2 build and the portable scalar build must agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralrs_cli.backends import native

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    fast = native.library()
    if fast is None:
        pytest.skip("no C compiler: the native kernels are optional")
    scalar = native.build(("-mno-avx2", "-mno-avx512f"), tmp_path_factory.mktemp("native"))
    return {"avx2": fast, "scalar": scalar}


def _reference(w: np.ndarray, qtype: Q, x: np.ndarray) -> np.ndarray:
    """What llama.cpp computes: weights as stored, activations through its q8_0 rounding."""
    wq = quants.dequantize(quants.quantize(w, qtype), qtype)
    xq = quants.dequantize(quants.quantize(x, Q.Q8_0), Q.Q8_0)
    return xq.astype(np.float64) @ wq.astype(np.float64).T


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 5, 9, 17])
def test_qmm_matches_reference(libs, qtype, m):
    rng = np.random.default_rng(m)
    n, k = 37, 96  # rows not a multiple of anything; three blocks per row
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    raw = torch.from_numpy(quants.quantize(w, qtype).copy())
    ref = _reference(w, qtype, x)
    for name, lib in libs.items():
        got = native.qmatmul(torch.from_numpy(x), [(raw, qtype, n)], lib).double().numpy()
        # codes may differ by one on rare rounding ties (gguf-py rounds half away from zero)
        assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max(), name


def test_parts_fill_their_columns(libs):
    rng = np.random.default_rng(0)
    k = 64
    ws = [(rng.standard_normal((rows, k)) * 0.1).astype(np.float32) for rows in (8, 3, 5)]
    types = [Q.Q5_0, Q.Q8_0, Q.Q4_0]
    parts = [(torch.from_numpy(quants.quantize(w, t).copy()), t, w.shape[0]) for w, t in zip(ws, types)]
    x = torch.randn(3, k)
    whole = native.qmatmul(x, parts, libs["avx2"])
    singles = torch.cat([native.qmatmul(x, [p], libs["avx2"]) for p in parts], dim=1)
    assert torch.equal(whole, singles)


def test_builds_agree(libs):
    rng = np.random.default_rng(1)
    for qtype in TYPES:
        w = (rng.standard_normal((16, 256)) * 0.1).astype(np.float32)
        raw = torch.from_numpy(quants.quantize(w, qtype).copy())
        x = torch.randn(4, 256)
        a = native.qmatmul(x, [(raw, qtype, 16)], libs["avx2"])
        b = native.qmatmul(x, [(raw, qtype, 16)], libs["scalar"])
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), qtype.name
