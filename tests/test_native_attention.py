"""csrc/attention.c's attn_batch at long contexts against a float64 numpy softmax: keys and values
read in blocks (several blocks, a partial last one), once per kv head for its group of query heads
(GQA 1, 3 and 4 query heads per kv head), sliding windows, logit softcaps, f16 and f32 caches, in
the three kernel builds. And what the engine relies on for batch invariance: a row's output is
bit for bit the same whatever the thread count and whatever other rows share the call (a decode
step alone splits its blocks across threads; inside a prompt's rows it is one task)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from mistralrs_cli.backends import native


def _attend(lib, q_rows, pos, k, v, nq, window=0, scale=0.125, softcap=0.0, threads=2, kv16=1):
    """attn_batch over one sequence: q_rows (n, nq * hd), keys/values (nkv, S, hd)."""
    nkv, S, hd = k.shape
    n = q_rows.shape[0]
    qkv = np.zeros((n, (nq + 2 * nkv) * hd), dtype=np.float32)
    qkv[:, :nq * hd] = q_rows
    att = np.full((n, nq * hd), np.nan, dtype=np.float32)
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    seq = (native.AttnSeq * 1)()
    seq[0].q, seq[0].n, seq[0].out, seq[0].pos = qkv.ctypes.data, n, att.ctypes.data, pos.ctypes.data
    seq[0].k, seq[0].v, seq[0].S, seq[0].sh, seq[0].ss = k.ctypes.data, v.ctypes.data, S, S * hd, hd
    lib.attn_batch(seq, 1, ctypes.c_int64(qkv.shape[1]), ctypes.c_int64(nq * hd), nq, nkv, hd, window,
                   ctypes.c_float(scale), ctypes.c_float(softcap), threads, kv16)
    return att


def _reference(q_rows, pos, k, v, nq, window=0, scale=0.125, softcap=0.0):
    nkv, _, hd = k.shape
    kf, vf = k.astype(np.float64), v.astype(np.float64)
    out = np.zeros(q_rows.shape, dtype=np.float64)
    for t, p in enumerate(pos):
        lo = max(0, p - window + 1) if window else 0
        for h in range(nq):
            g = h // (nq // nkv)
            sc = kf[g, lo:p + 1] @ q_rows[t, h * hd:(h + 1) * hd].astype(np.float64) * scale
            if softcap:
                sc = np.tanh(sc / softcap) * softcap
            w = np.exp(sc - sc.max())
            out[t, h * hd:(h + 1) * hd] = (w / w.sum()) @ vf[g, lo:p + 1]
    return out


def _case(seed, nq, nkv, hd, S, n_rows, dtype=np.float16):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((n_rows, nq * hd)) * 0.5).astype(np.float32)
    k = rng.standard_normal((nkv, S, hd)).astype(dtype)
    v = rng.standard_normal((nkv, S, hd)).astype(dtype)
    return q, k, v


CASES = {  # nq, nkv, hd, S (keys), window, softcap: SmolLM2's and Gemma-3's shapes, MHA, an odd hd
    "smollm2-2k": (9, 3, 64, 2100, 0, 0.0),
    "gemma3-global": (4, 1, 256, 1300, 0, 0.0),
    "gemma3-local": (4, 1, 256, 1300, 512, 0.0),
    "mha-softcap": (2, 2, 40, 600, 0, 30.0),
    "window-not-block-aligned": (2, 1, 64, 900, 300, 0.0),
    "mha-128": (4, 4, 128, 700, 0, 0.0),  # LLaVA's heads: a prompt's rows go in groups of 4
    "mha-window-softcap": (2, 2, 64, 900, 300, 20.0),
}


@pytest.mark.parametrize("build", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_long_context_matches_float64_softmax(kernel_builds, build, name):
    nq, nkv, hd, S, window, cap = CASES[name]
    q, k, v = _case(1, nq, nkv, hd, S, 3)
    pos = np.array([S - 1, S // 2, 7])  # a long row, a middle one, a short one (one block)
    for kk, vv, kv16 in ((k, v, 1), (k.astype(np.float32), v.astype(np.float32), 0)):
        got = _attend(kernel_builds[build], q, pos, kk, vv, nq, window, softcap=cap, kv16=kv16)
        assert np.abs(got - _reference(q, pos, k, v, nq, window, softcap=cap)).max() < 2e-5


@pytest.mark.parametrize("name", ["smollm2-2k", "gemma3-global", "gemma3-local", "mha-128", "mha-window-softcap"])
def test_a_row_is_the_same_alone_in_a_batch_and_on_any_thread_count(kernel_builds, name):
    nq, nkv, hd, S, window, cap = CASES[name]
    q, k, v = _case(2, nq, nkv, hd, S, 12)
    pos = np.arange(S - 12, S)
    lib = kernel_builds["native"]
    together = _attend(lib, q, pos, k, v, nq, window, threads=2)  # 12 rows: one task per (row, kv head)
    for threads in (1, 2, 3):
        for t in (0, 11):  # a decode step alone: its blocks split across the threads
            alone = _attend(lib, q[t:t + 1], pos[t:t + 1], k, v, nq, window, threads=threads)
            assert np.array_equal(alone[0], together[t])
        assert np.array_equal(_attend(lib, q, pos, k, v, nq, window, threads=threads), together)


def test_f16_cache_gives_what_f32_storage_of_the_same_values_gives(kernel_builds):
    nq, nkv, hd, S = 9, 3, 64, 700
    q, k, v = _case(3, nq, nkv, hd, S, 2)
    pos = np.array([S - 1, S - 2])
    a = _attend(kernel_builds["native"], q, pos, k, v, nq, kv16=1)
    b = _attend(kernel_builds["native"], q, pos, k.astype(np.float32), v.astype(np.float32), nq, kv16=0)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["mha-128", "mha-window-softcap"])
def test_prompt_rows_taken_together_give_each_row_alone(kernel_builds, name):
    """One query head per kv head: a prompt's rows go in groups of 4 that share each key's load.
    Rows whose last blocks differ (positions around a block edge and a 16-key edge, a short row,
    a row count that is not a multiple of 4, positions out of order) each give what they give
    alone (a decode step), bit for bit, and the float64 softmax's values."""
    nq, nkv, hd, S, window, cap = CASES[name]
    pos = np.array([254, 255, 256, 257, 258, 270, 271, 272, 3, 599, 598, 15, 16])
    q, k, v = _case(4, nq, nkv, hd, S, len(pos))
    for lib in (kernel_builds["native"], kernel_builds["avx2"]):
        for kk, vv, kv16 in ((k, v, 1), (k.astype(np.float32), v.astype(np.float32), 0)):
            together = _attend(lib, q, pos, kk, vv, nq, window, softcap=cap, kv16=kv16)
            for t in range(len(pos)):
                alone = _attend(lib, q[t:t + 1], pos[t:t + 1], kk, vv, nq, window, softcap=cap, threads=1, kv16=kv16)
                assert np.array_equal(alone[0], together[t]), t
            ref = _reference(q, pos, k, v, nq, window, softcap=cap)
            assert np.abs(together - ref).max() < 2e-5


@pytest.mark.parametrize("name", ["smollm2-2k", "gemma3-local", "mha-128"])
def test_a_long_prompt_in_row_chunks_gives_each_row_alone(kernel_builds, name):
    """A prompt's rows are taken in chunks (each block of keys for all the chunk's rows in turn):
    64 rows at the end of a long context, in chunks of 4-16, each row as it is alone and as the
    float64 softmax says."""
    nq, nkv, hd, S, window, cap = CASES[name]
    q, k, v = _case(5, nq, nkv, hd, S, 64)
    pos = np.arange(S - 64, S)
    lib = kernel_builds["native"]
    together = _attend(lib, q, pos, k, v, nq, window, softcap=cap)
    for t in (0, 1, 5, 31, 62, 63):
        alone = _attend(lib, q[t:t + 1], pos[t:t + 1], k, v, nq, window, softcap=cap, threads=1)
        assert np.array_equal(alone[0], together[t]), t
    assert np.abs(together - _reference(q, pos, k, v, nq, window, softcap=cap)).max() < 2e-5
