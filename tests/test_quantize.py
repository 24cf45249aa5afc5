"""mistralrs_cli.quant.quantize against independent references:
- F16, BF16, Q4_0..Q8_0 bytes equal gguf-py's quantizers (ports of ggml's reference) on random
  rows, rows of zeros, tiny values and +-max;
- every type's bytes read back by gguf-py's dequantizer (or, for Q8_1/Q8_K/HQQ, a numpy decoder
  written here from the block layout) equal our own dequantization, bit for bit;
- the RMSE of each type on one seeded matrix falls in llama.cpp's order (printed with -s);
- our bytes match llama.cpp's own quantize_row_*_ref (its libggml-base, built from a pinned
  source package by tests/ggml_reference.py): every block for the simple types, over 99% for the
  K types."""
from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ggml_reference import ggml_library
from mistralrs_cli.quant.dequant import block_size, dequantize, row_bytes
from mistralrs_cli.quant.hqq import HQQ
from mistralrs_cli.quant.quantize import QUANTIZERS, quantize

GGUF_QUANTIZE = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K]
ALL = GGUF_QUANTIZE + [Q.Q8_1] + K_TYPES + list(HQQ)
FMAX = float(np.finfo(np.float32).max)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Elementwise ops on small tensors: 2 OpenMP threads on a busy 2-core box cost 20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hard_matrix(n_cols: int, seed: int = 0, floats: bool = False) -> np.ndarray:
    """(24, n_cols) f32: normal rows at several scales, zeros, tiny values, +-max, a flat block,
    and (for the float types) inf and NaN."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, n_cols)).astype(np.float32)
    w[1] = 0
    w[2] *= 1e-30                        # tiny but normal (denormal scales are UB in the C casts)
    w[3, ::2], w[3, 1::2] = FMAX, -FMAX   # the extremes
    w[4] = FMAX * rng.uniform(-1, 1, n_cols).astype(np.float32)
    w[5, :32] = 0.5                      # a constant block
    w[6] *= 1e4
    w[7, : n_cols // 2] = 0              # half zeros
    w[8] = np.abs(w[8])                  # one-signed rows (min > 0 / max < 0)
    w[9] = -np.abs(w[9])
    if floats:
        w[10, :3] = [np.inf, -np.inf, np.nan]
        w[11] = 7e4 * rng.standard_normal(n_cols)  # beyond fp16's range
    return w


@pytest.mark.parametrize("qtype", GGUF_QUANTIZE, ids=lambda t: t.name)
def test_bit_exact_with_gguf_py(qtype):
    w = hard_matrix(256, floats=qtype in (Q.F16, Q.BF16))
    with np.errstate(all="ignore"):
        want = np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(24, -1)
    got = quantize(torch.from_numpy(w), qtype)
    assert got.dtype == torch.uint8 and got.shape == (24, row_bytes(qtype, 256))
    assert np.array_equal(got.numpy(), want)


def own_reference(raw: np.ndarray, qtype) -> np.ndarray:
    """Decoders for the types gguf-py cannot read, from the block layouts: Q8_1 (d, s fp16, int8
    codes), Q8_K (d f32, int8 codes, int16 sums) and HQQ (scale, zero f32, 4/8-bit codes)."""
    nbytes = row_bytes(qtype, block_size(qtype))
    b = raw.reshape(-1, nbytes)
    if qtype == Q.Q8_1:
        out = b[:, 4:].view(np.int8).astype(np.float32) * b[:, :2].copy().view(np.float16).astype(np.float32)
    elif qtype == Q.Q8_K:
        out = b[:, 4:260].view(np.int8).astype(np.float32) * b[:, :4].copy().view(np.float32)
    else:
        head = b[:, :8].copy().view(np.float32)
        codes = b[:, 8:]
        if qtype == HQQ.HQQ4:
            codes = np.concatenate([codes & 15, codes >> 4], axis=1)
        out = (codes.astype(np.float32) - head[:, 1:2]) * head[:, 0:1]
    return out.reshape(raw.shape[0], -1)


def check_fields(raw: np.ndarray, qtype) -> None:
    """The fields only dot products read: Q8_1's s = d * sum(q), Q8_K's 16 block sums."""
    b = raw.reshape(-1, row_bytes(qtype, block_size(qtype)))
    if qtype == Q.Q8_1:
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        s = b[:, 2:4].copy().view(np.float16)
        q = b[:, 4:].view(np.int8).astype(np.float32)
        # ggml multiplies by the f32 d before it is stored as fp16: equal to fp16 precision
        want, ok = q.sum(1, keepdims=True) * d, np.isfinite(s)
        np.testing.assert_allclose(s[ok].astype(np.float32), want[ok], rtol=2e-3, atol=1e-6)
        assert (np.abs(want[~ok]) > 65000).all()  # only sums beyond fp16 overflow
    if qtype == Q.Q8_K:
        q = b[:, 4:260].view(np.int8).astype(np.int32).reshape(-1, 16, 16)
        assert np.array_equal(b[:, 260:].copy().view(np.int16), q.sum(-1))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_round_trip_read_by_reference(qtype):
    w = hard_matrix(512, seed=1)
    w[3:5] *= 3e4 / FMAX  # stored fp16 scales must stay finite for the read-back to be defined
    raw = quantize(torch.from_numpy(w), qtype).numpy()
    ours = dequantize(torch.from_numpy(raw), qtype)
    if qtype in (Q.Q8_1, Q.Q8_K) or isinstance(qtype, HQQ):
        ref = own_reference(raw, qtype)
        check_fields(raw, qtype)
    else:
        ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(ours.numpy(), np.asarray(ref, dtype=np.float32))
    finite = np.isfinite(w).all(1) & (np.abs(w).max(1) < 6e4)  # rows fp16 scales can express
    assert torch.isfinite(ours[finite]).all()
    assert torch.equal(ours[1], torch.zeros(512))  # zeros stay zeros
    err = (ours[0] - torch.from_numpy(w[0])).abs().max()
    assert err < 1.0, f"{qtype.name}: a normal row came back off by {err}"


def test_shapes_dtypes_and_errors():
    w = torch.randn(3, 4, 64)
    flat = quantize(w.view(12, 64), Q.Q4_0)
    assert torch.equal(quantize(w, Q.Q4_0), flat.view(3, 4, -1))
    assert torch.equal(quantize(w.bfloat16(), Q.Q8_0), quantize(w.bfloat16().float(), Q.Q8_0))
    assert torch.equal(quantize(w.view(12, 64), Q.Q4_0, chunk=160), flat)  # chunking is invisible
    with pytest.raises(ValueError, match="no quantizer for IQ2_XXS"):
        quantize(torch.zeros(1, 256), Q.IQ2_XXS)
    assert set(QUANTIZERS) >= set(ALL)


# --- quality: llama.cpp's order ----------------------------------------------------------------------

ORDER_K = [Q.Q8_K, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K]
ORDER_LEGACY = [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0]


def rmse_table(w: torch.Tensor) -> dict:
    table = {}
    for qtype in [Q.F16, Q.BF16, Q.Q8_0, Q.Q8_1, *ORDER_K, *ORDER_LEGACY[1:], *HQQ]:
        back = dequantize(quantize(w, qtype), qtype)
        table[qtype] = float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    return table


def test_rmse_order(capsys):
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(256, 1024, generator=gen) * 0.02  # a weight matrix's usual spread
    w[:, ::97] *= 8  # a few outlier columns, as trained weights have
    table = rmse_table(w)
    with capsys.disabled():
        print("\n| type | bits/weight | relative RMSE |\n|---|---|---|")
        for qtype, e in sorted(table.items(), key=lambda kv: kv[1]):
            bpw = 8 * row_bytes(qtype, 1024) / 1024
            print(f"| {qtype.name} | {bpw:.4g} | {e:.5f} |")
    errs = [table[t] for t in ORDER_K]
    assert errs == sorted(errs) and len(set(errs)) == len(errs), "K types: Q8 < Q6 < Q5 < Q4 < Q3 < Q2"
    errs = [table[t] for t in ORDER_LEGACY]
    assert errs == sorted(errs), "legacy types: Q8_0 < Q5_1 < Q5_0 < Q4_1 < Q4_0"
    assert table[Q.Q4_K] < table[Q.Q4_1] and table[Q.Q5_K] < table[Q.Q5_1]  # K-quants earn their keep
    assert table[HQQ.HQQ8] < table[Q.Q6_K] and table[Q.Q5_K] < table[HQQ.HQQ4] < table[Q.Q3_K]
    assert table[Q.F16] < table[Q.BF16] < table[Q.Q8_0] == table[Q.Q8_1]
    # uniform rounding: RMSE ~ step / sqrt(12), the step ~ a block's range (5-8 sigma) / levels
    assert 0.05 < table[Q.Q4_0] < 0.2 and 0.003 < table[Q.Q8_0] < 0.015


# --- llama.cpp itself (tests/ggml_reference.py builds its libggml-base) -----------------------------------------------------

@pytest.mark.parametrize("qtype", K_TYPES + [Q.Q8_1, Q.Q4_0, Q.Q5_1], ids=lambda t: t.name)
def test_matches_llama_cpp_reference(qtype):
    lib = ggml_library()
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    w = np.random.default_rng(7).standard_normal((128, 1024)).astype(np.float32)
    w[1], w[2] = 0, w[2] * 1e-3
    want = np.zeros((128, row_bytes(qtype, 1024)), np.uint8)
    fn(w.ctypes.data, want.ctypes.data, w.size)
    got = quantize(torch.from_numpy(w), qtype).numpy()
    nbytes = row_bytes(qtype, block_size(qtype))
    same = (got.reshape(-1, nbytes) == want.reshape(-1, nbytes)).all(1).mean()
    # the searches sum in C's order too; a last-bit difference still flips a rare exact tie
    assert same >= (1.0 if qtype in (Q.Q8_1, Q.Q4_0, Q.Q5_1, Q.Q8_K) else 0.99), same
    x = torch.from_numpy(w)
    ours = (dequantize(torch.from_numpy(got), qtype) - x).pow(2).mean().sqrt()
    theirs = (dequantize(torch.from_numpy(want), qtype) - x).pow(2).mean().sqrt()
    assert abs(float(ours / theirs) - 1) < 1e-3
