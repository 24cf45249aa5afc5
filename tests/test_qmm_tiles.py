"""The packed GEMM tiles (backends/csrc/packed.c) at awkward shapes: activation rows M that
leave every tile size's remainder (8 / 4 / 2 / 1 rows) and weight rows that leave a lone
8-row group, a half-filled pair or a cut last group. Three builds: the default one (-march=native:
16-row zmm tiles where the CPU has AVX-512 VNNI), a 256-bit one (-mno-avx512f: 8-row tiles)
and the portable scalar one. Each against a float64 reference from the dequantized weights and
llama.cpp's activation rounding; the 256-bit and the native build must agree bit for bit
(same integer sums, the same f32 steps in every lane)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import gguf_builder as gb
from mistralrs_cli.backends import native

MS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 27]
ROWS = [5, 8, 16, 21, 24, 40]




def _weights(qtype: Q, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks, the weights they decode to, float64)."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        raw = gb.random_blocks((n, k), qtype, seed=seed)
    else:
        w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
        raw = quants.quantize(w, qtype).copy()
    return raw, quants.dequantize(raw, qtype).astype(np.float64)


def _any_weights(qtype: Q, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """_weights for the types gguf-py quantizes; random blocks (finite scales) for the rest."""
    if qtype in native.K_TYPES or qtype not in gb.QUANTIZABLE:
        raw = gb.random_blocks((n, k), qtype, seed=seed)
        return raw, quants.dequantize(raw, qtype).astype(np.float64)
    return _weights(qtype, n, k, seed)


def _norm_and_bias(rng, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An RMSNorm weight near 1 (k) and a bias (n), f32."""
    return (1 + 0.1 * rng.standard_normal(k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)


def _q8_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_K rounding (see test_native)."""
    xb = x.reshape(-1, 256).astype(np.float32)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(1)][:, None]
    iscale = np.float32(-127.0) / np.where(mx == 0, np.float32(1), mx)
    q = np.minimum(np.rint(xb * iscale), 127)
    return np.where(mx == 0, 0, q / iscale).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n", ROWS)
def test_tiles_match_reference(kernel_builds, qtype, n):
    k = 512
    raw, w = _weights(qtype, n, k, seed=n)
    rng = np.random.default_rng(100 + n)
    for m in MS:
        x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
        if qtype in (Q.Q4_K, Q.Q6_K):
            xr = _q8_k(x)
        else:
            xr = quants.dequantize(quants.quantize(x, Q.Q8_0), Q.Q8_0)
        ref = xr.astype(np.float64) @ w.T
        outs = {}
        for name, lib in kernel_builds.items():
            got = native.qmatmul(torch.from_numpy(x), [(torch.from_numpy(raw), qtype, n)], lib)
            outs[name] = got
            err = np.abs(got.double().numpy() - ref).max()
            # codes may differ by one on rare rounding ties (gguf-py rounds half away from zero)
            assert err <= 2e-3 * np.abs(ref).max(), (name, m, err)
        # Q8_0 too: without VNNI both take the 16-bit tiles; with it the 8-bit zmm tiles give
        # the same integers as the 256-bit build's 16-bit ones (fast rounding)
        assert torch.equal(outs["native"], outs["avx2"]), (m, (outs["native"] - outs["avx2"]).abs().max())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_parts_and_rows_are_independent(kernel_builds, qtype):
    """A row of the output does not depend on which other rows (activation or weight) share its
    call: M rows at once equal each row alone, stacked parts equal each part alone."""
    k = 256
    parts = []
    for i, n in enumerate((24, 13, 40)):
        raw, _ = _weights(qtype, n, k, seed=7 + i)
        parts.append((torch.from_numpy(raw), qtype, n))
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(3)) * 2
    lib = kernel_builds["native"]
    whole = native.qmatmul(x, parts, lib)
    singles = torch.cat([native.qmatmul(x, [p], lib) for p in parts], dim=1)
    assert torch.equal(whole, singles)
    rows = torch.cat([native.qmatmul(x[i:i + 1], parts, lib) for i in range(x.shape[0])])
    assert torch.equal(whole, rows)


@pytest.mark.parametrize("qtype", sorted(native.TYPES), ids=lambda t: Q(t).name)
def test_precise_activations(kernel_builds, qtype):
    """qmm_opts.precise (--numerics precise): activations rounded in two 8-bit parts, so the
    result is the unrounded activations times the dequantized weights (gguf-py's dequantize,
    float64) within ~16-bit rounding (~2e-5 of the largest output here), where llama.cpp's one 8-bit
    rounding is ~100x further off;
    with a fused RMSNorm before and a bias + residual add after, in every build."""
    k, n = 512, 21
    raw, w = _any_weights(qtype, n, k, seed=5)
    rng = np.random.default_rng(11)
    norm_w, bias = _norm_and_bias(rng, k, n)
    for m in (1, 2, 3, 9, 17):
        x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
        x64 = x.astype(np.float64)
        xn = x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-6) * norm_w
        ref = xn @ w.T + bias
        scale = np.abs(ref).max()
        for name, lib in kernel_builds.items():
            errs = {}
            for precise in (True, False):
                res = np.zeros((m, n), dtype=np.float32)
                opts = native.qmm_opts(norm_w, 1e-6, bias=bias, precise=precise)
                opts.residual, opts.ld_res = res.ctypes.data, n
                native.qmatmul(x, [(raw, qtype, n)], lib, opts)
                errs[precise] = np.abs(res - ref).max() / scale
            assert errs[True] < 1e-4, (name, m, errs)
            assert errs[False] > 20 * errs[True], (name, m, errs)  # the 8-bit rounding really is gone


@pytest.fixture(scope="module")
def panel_builds(tmp_path_factory):
    """The native build with qmm_parts' panels at small sizes (slot blocks of 4 KB of rounded
    activations, at least 4 slots; panels of ~12 KB of weights: 2 units of 512-wide Q4_K or
    Q5_0 rows), and one that never panels (every unit over all slots)."""
    d = tmp_path_factory.mktemp("panels")
    small = ("-DQMM_SLOT_BLOCK_BYTES=4096", "-DQMM_SLOT_BLOCK_MIN=4", "-DQMM_PANEL_BYTES=12000")
    return native.build(small, d), native.build(("-DQMM_SLOT_BLOCK_BYTES=1073741824",), d)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_panels_give_the_same_bits(panel_builds, qtype):
    """A prompt's units in panels and its slots in blocks (qmm_parts, for wide rows) give every
    output and every residual sum bit for bit as whole calls do, with the fused norm, bias and
    residual add, precise and fast; and within the reference's tolerance of the dequantized
    product."""
    panelled, whole = panel_builds
    k, n = 512, 40  # 5 groups: 3 units, a panel of 2 and a lone one
    raw, w = _any_weights(qtype, n, k, seed=9)
    rng = np.random.default_rng(5)
    norm_w, bias = _norm_and_bias(rng, k, n)
    for m in (5, 13, 29):
        x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-6) * norm_w @ w.T + bias
        for precise in (True, False):
            outs = []
            for lib in (panelled, whole):
                res = np.ones((m, n), dtype=np.float32)
                opts = native.qmm_opts(norm_w, 1e-6, bias=bias, precise=precise)
                opts.residual, opts.ld_res = res.ctypes.data, n
                native.qmatmul(x, [(raw, qtype, n)], lib, opts)
                outs.append(res)
            assert np.array_equal(outs[0], outs[1]), (m, precise)
            assert np.abs(outs[0] - 1 - ref).max() <= 2e-2 * np.abs(ref).max(), (m, precise)
