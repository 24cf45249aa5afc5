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


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_K activation rounding, written from its definition: per 256 values the
    signed value of largest magnitude maps to -127, codes round half to even, capped at 127."""
    xb = x.reshape(-1, 256).astype(np.float32)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(1)][:, None]
    iscale = np.float32(-127.0) / np.where(mx == 0, np.float32(1), mx)
    q = np.minimum(np.rint(xb * iscale), 127)
    return np.where(mx == 0, 0, q / iscale).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 10])
def test_k_types_match_reference(libs, qtype, m):
    """K weights (random blocks with finite scales, decoded by gguf-py) times q8_K activations."""
    import gguf_builder as gb

    n, k = 21, 512
    raw = gb.random_blocks((n, k), qtype, seed=m)
    w = quants.dequantize(raw, qtype).astype(np.float64)
    x = (np.random.default_rng(m).standard_normal((m, k)) * 2).astype(np.float32)
    ref = _q8_k_reference(x).astype(np.float64) @ w.T
    for name, lib in libs.items():
        got = native.qmatmul(torch.from_numpy(x), [(torch.from_numpy(raw), qtype, n)], lib).double().numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0], ids=lambda t: t.name)
def test_repacked_bytes_equal_the_gguf_blocks(libs, qtype):
    """The 8-row layout keeps each type's GGUF byte count (gguf-py's block sizes): a decode token
    streams no more weight bytes than llama.cpp's (Q5_0 once took one byte per weight: 34 per 32)."""
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    assert block == 32
    assert libs["avx2"].packed_block_bytes(int(qtype)) == 8 * size
    assert libs["scalar"].packed_block_bytes(int(qtype)) == 8 * size
