"""What the engine's bit-for-bit batch invariance on the native runtime rests on (see
test_engine_batch.py): qmm_parts computes each activation row's outputs on their own, in an order
fixed by that row alone. So a row gives the same bits whether it is multiplied alone (a decode
step), inside a prompt chunk, beside other sequences' rows, or on any number of threads; for every
weight type the kernels serve, both activation roundings (precise and fast), with and without the
fused norm / activation / bias / residual, in each kernel build (-march=native: AVX-512 tiles
where the CPU has them; 256-bit; scalar). Attention rows: test_native_attention.py."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

import gguf_builder as gb
from mistralrs_cli.backends import native

K, N, M = 512, 40, 19  # 40 weight rows: five 8-row groups (two pairs and a lone one)
SPLITS = [(0, 1), (1, 5), (5, 13), (13, 19)]  # a decode row, and prompt chunks of 4, 8 and 6 rows


def _weights(qtype: Q, seed: int) -> np.ndarray:
    if qtype in native.K_TYPES or qtype not in gb.QUANTIZABLE:
        return gb.random_blocks((N, K), qtype, seed=seed)
    w = (np.random.default_rng(seed).standard_normal((N, K)) * 0.1).astype(np.float32)
    return quants.quantize(w, qtype)


def _fused(kind: str, rng) -> tuple[dict, int]:
    """qmm_opts keyword arguments for one fusion, and the input width it takes."""
    if kind == "plain":
        return {}, K
    if kind == "norm+bias":
        return {"norm": (1 + 0.1 * rng.standard_normal(K)).astype(np.float32), "eps": 1e-6,
                "bias": rng.standard_normal(N).astype(np.float32)}, K
    return {"act": 1}, 2 * K  # SiLU(gate) * up: the input holds gate and up side by side


def _run(lib, x, plan, fuse, precise, threads, residual):
    opts = native.qmm_opts(**fuse, precise=precise)
    res = residual.copy()  # the epilogue adds the output into it in place
    opts.residual, opts.ld_res = res.ctypes.data, N
    y = native.qmatmul(x, plan, lib, opts, n_threads=threads)
    return y, res


@pytest.mark.parametrize("build", ["native", "avx2", "scalar"])
@pytest.mark.parametrize("qtype", sorted(native.TYPES), ids=lambda t: Q(t).name)
def test_a_row_gives_the_same_bits_alone_in_a_chunk_and_on_any_thread_count(kernel_builds, build, qtype):
    lib = kernel_builds[build]
    rng = np.random.default_rng(int(qtype))
    plan = native.Plan([(_weights(Q(qtype), seed=int(qtype)), qtype, N)], lib)  # repacked once
    for kind in ("plain", "norm+bias", "silu"):
        fuse, width = _fused(kind, rng)
        x = (rng.standard_normal((M, width)) * 2).astype(np.float32)
        residual = rng.standard_normal((M, N)).astype(np.float32)
        for precise in (True, False):
            whole, whole_res = _run(lib, x, plan, fuse, precise, 2, residual)
            assert np.isfinite(whole).all()
            for threads in (1, 3):  # one thread; more threads than cores, an uneven split
                for a, b in SPLITS:
                    y, res = _run(lib, x[a:b], plan, fuse, precise, threads, residual[a:b])
                    where = (kind, precise, threads, a, b)
                    assert np.array_equal(y, whole[a:b]), where
                    assert np.array_equal(res, whole_res[a:b]), where
