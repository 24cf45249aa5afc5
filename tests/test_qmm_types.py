"""The unpacked-row kernels of csrc/qmatmul.c for Q5_1, Q2_K, Q3_K, IQ4_NL and IQ4_XS.

Each against a float64 reference: gguf-py's dequantized weights times the activations rounded as
llama.cpp's CPU backend rounds them for that weight type (its vec_dot_type: q8_1 for Q5_1, q8_0
for IQ4_NL, q8_K for the rest), written here in numpy from llama.cpp's formulas. In three builds
(native, 256-bit, scalar), with llama.cpp's rounding and with qmm_opts.precise; then tiny GGUF
models of each type through the native runtime against the torch path (which shares these
kernels) and, with precise numerics, against the torch path's exact numerics (which does not).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

import gguf_builder as gb
from mistralrs_cli.backends import native
from mistralrs_cli.backends.native_model import NativeModel
from test_native_model import _close, _load, _steps

NEW = [Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS]
MS = [1, 2, 3, 8, 17]




def _raw(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    """(n, row bytes) of qtype blocks whose weights are finite and of a sane size."""
    if qtype == Q.Q5_1:
        w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
        return quants.quantize(w, qtype).copy()
    return gb.random_blocks((n, k), qtype, seed=seed)  # finite fp16 scales (gguf_builder._K_SCALES)


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's q8_0 / q8_1 rounding per 32: (codes, fp16 scale, q8_1's fp16 d * sum(codes)),
    in f32 as its quantize_row_q8_1 (scale amax / 127, codes rint(x * 127 / amax))."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(amax == 0, np.float32(0), np.float32(127) / np.where(amax == 0, np.float32(1), amax))
    q = np.rint(xb * inv)
    s = (d[:, 0] * q.sum(1)).astype(np.float16).astype(np.float64)
    return q, d.astype(np.float16).astype(np.float64), s


def _q8_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_K rounding per 256 (quantize_row_q8_K): the value x decodes to."""
    xb = x.reshape(-1, 256).astype(np.float32)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(1)][:, None]
    iscale = np.float32(-127.0) / np.where(mx == 0, np.float32(1), mx)
    q = np.minimum(np.rint(xb * iscale), 127)
    return np.where(mx == 0, 0, q.astype(np.float64) / iscale.astype(np.float64)).reshape(x.shape)


def _reference(qtype: Q, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x rounded as llama.cpp rounds it for qtype, times the dequantized weights (float64)."""
    w = quants.dequantize(raw, qtype).astype(np.float64)
    m, k = x.shape
    if qtype in (Q.Q2_K, Q.Q3_K, Q.IQ4_XS):
        return _q8_k(x) @ w.T
    q, d, s = _q8_0(x)
    xr = (q * d).reshape(m, k)
    if qtype == Q.IQ4_NL:
        return xr @ w.T
    # Q5_1: w = d_w q + m_w; the m_w part multiplies q8_1's rounded block sums, not the codes
    mins = raw.reshape(raw.shape[0], -1, 24)[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return xr @ (w - np.repeat(mins, 32, axis=1)).T + s.reshape(m, -1) @ mins.T


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_kernels_match_reference(kernel_builds, qtype):
    k, n = 512, 21
    raw = _raw(qtype, n, k, seed=int(qtype))
    rng = np.random.default_rng(100 + int(qtype))
    worst = 0.0
    for m in MS:
        x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
        ref = _reference(qtype, raw, x)
        scale = np.abs(ref).max()
        outs = {}
        for name, lib in kernel_builds.items():
            outs[name] = native.qmatmul(x, [(raw, qtype, n)], lib)
            err = np.abs(outs[name] - ref).max() / scale
            worst = max(worst, err)
            # the rounding is reproduced exactly: what is left is f32 accumulation
            assert err < 1e-5, (name, m, err)
        # same integer sums, same f32 steps: the 256-bit and the native build agree bit for bit,
        # and for the 256-blocks (vector integer sums, then scalar f32 steps) the scalar build too
        assert np.array_equal(outs["native"], outs["avx2"]), m
        if qtype in native.K_TYPES:
            assert np.array_equal(outs["native"], outs["scalar"]), m
    print(f"{qtype.name}: max |err| / max |ref| = {worst:.1e}")


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_precise_activations(kernel_builds, qtype):
    """qmm_opts.precise: the unrounded activations times the dequantized weights within ~16-bit
    rounding, where llama.cpp's one 8-bit rounding is far further off (as test_qmm_tiles')."""
    k, n = 512, 21
    raw = _raw(qtype, n, k, seed=50 + int(qtype))
    w = quants.dequantize(raw, qtype).astype(np.float64)
    rng = np.random.default_rng(7)
    worst = 0.0
    for m in MS:
        x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
        ref = x.astype(np.float64) @ w.T
        scale = np.abs(ref).max()
        for name, lib in kernel_builds.items():
            errs = {}
            for precise in (True, False):
                got = native.qmatmul(x, [(raw, qtype, n)], lib, native.qmm_opts(precise=precise))
                errs[precise] = np.abs(got - ref).max() / scale
            worst = max(worst, errs[True])
            assert errs[True] < 1e-4, (name, m, errs)
            assert errs[False] > 20 * errs[True], (name, m, errs)
    print(f"{qtype.name}: precise max |err| / max |ref| = {worst:.1e}")


def test_rows_not_whole_blocks_are_refused(kernel_builds):
    """The 256-block types need K a multiple of 256 (native_model checks K_TYPES first)."""
    assert {Q.Q2_K, Q.Q3_K, Q.IQ4_XS} <= native.K_TYPES and Q.Q5_1 not in native.K_TYPES
    raw = _raw(Q.Q5_1, 4, 288, seed=1)
    x = np.ones((2, 288), dtype=np.float32)
    assert native.qmatmul(x, [(raw, Q.Q5_1, 4)], kernel_builds["native"]).shape == (2, 4)
    with pytest.raises(RuntimeError):  # 288 = 9 blocks of 32 but not whole 256-blocks
        native.qmatmul(x, [(raw, Q.Q2_K, 4)], kernel_builds["native"])


@pytest.fixture(scope="module")
def vocab():
    return gb.gguf_vocab(gb.train_tokenizer())


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_native_model_runs_the_type(tmp_path, vocab, qtype):
    """A tiny llama whose every matrix is qtype (gguf-py quantizes Q5_1; the others are random
    codes with finite scales) loads as a NativeModel and agrees with the torch path as
    test_native_model's cases do."""
    hf = gb.tiny_llama(10 + int(qtype), hidden_size=256, intermediate_size=512)
    types = {n: qtype for n, w in gb.gguf_tensors(hf).items() if w.ndim == 2}
    path = gb.write_gguf(tmp_path / f"{qtype.name}.gguf", hf, vocab=vocab, tensor_types=types)
    model = _load(path)
    assert isinstance(model, NativeModel), "the native runtime should take this file"
    torch_model = _load(path, runtime="torch")
    assert not isinstance(torch_model, NativeModel)
    prompt = list(range(3, 40, 2))
    want = _steps(torch_model, prompt, 6)
    worst = _close(_steps(model, prompt, 6), want)
    print(f"{qtype.name}: max |Δlogit| / max |logit| = {worst:.1e}")
    assert worst < 1e-2
    assert _close(_steps(model, prompt, 2, chunk=5), want[:3]) < 1e-2
    # both paths above share these kernels; the torch path's exact numerics (dequantized f32
    # weights, no kernel of ours, an f32 KV cache) is independent of them: ~16-bit activations
    # and the f16 KV cache agree with it (measured up to 2.1e-3 on these random models; 1e-3
    # before the cache was f16)
    exact = _steps(_load(path, runtime="torch", numerics="exact"), prompt, 6)
    precise = _load(path, numerics="precise")
    assert isinstance(precise, NativeModel)
    worst = _close(_steps(precise, prompt, 6), exact)
    print(f"{qtype.name}: precise vs exact max |Δlogit| / max |logit| = {worst:.1e}")
    assert worst < 5e-3


def test_references_are_not_trivial():
    """The references above would pass vacuously if dequantize gave zeros."""
    for qtype in NEW:
        w = quants.dequantize(_raw(qtype, 4, 256, seed=3), qtype)
        assert np.isfinite(w).all() and w.std() > 0, qtype.name
