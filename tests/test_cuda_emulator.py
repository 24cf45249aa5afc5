"""The CPU emulator of CUDA itself: its device functions against numpy, and deliberately broken
kernels that must fail with a message naming the kernel, the block and the thread."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cuda_emu import EmuError, EmuLauncher, EmuModule

FULL = "0xffffffffu"
FEATURES = r"""
#include <cuda/std/cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void features(const int* a, const int* b, const float* f, int* dp, unsigned* ballot,
                                    float* sums, float* idx3, float* up1, int* counter,
                                    unsigned short* h, unsigned short* bf, float* back) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    dp[t] = __dp4a(a[t], b[t], t);
    ballot[t] = __ballot_sync(FULL, f[t] > 0.f);
    float s = f[t];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    sums[t] = s;
    idx3[t] = __shfl_sync(FULL, f[t], 3);
    up1[t] = __shfl_up_sync(FULL, f[t], 1);
    atomicAdd(counter, 1);
    atomicMax(counter + 1, t);
    h[t] = __half_as_ushort(__float2half_rn(f[t]));
    bf[t] = __bfloat16_as_ushort(__float2bfloat16_rn(f[t]));
    back[t] = __half2float(__ushort_as_half(h[t])) + __bfloat162float(__ushort_as_bfloat16(bf[t]));
}
""".replace("FULL", FULL)


def test_device_functions_match_numpy():
    n = 64  # two blocks of one warp each
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32) for _ in range(2))
    f = (rng.standard_normal(n) * 100).astype(np.float32)
    out = dict(dp=np.zeros(n, np.int32), ballot=np.zeros(n, np.uint32), sums=np.zeros(n, np.float32),
               idx3=np.zeros(n, np.float32), up1=np.zeros(n, np.float32), counter=np.zeros(2, np.int32),
               h=np.zeros(n, np.uint16), bf=np.zeros(n, np.uint16), back=np.zeros(n, np.float32))
    EmuModule(FEATURES).get_function("features")((2,), (32,), (a, b, f, *out.values()))
    bytes_a, bytes_b = a.view(np.int8).reshape(n, 4).astype(np.int64), b.view(np.int8).reshape(n, 4).astype(np.int64)
    assert np.array_equal(out["dp"], (bytes_a * bytes_b).sum(1) + np.arange(n))
    warps = (f > 0).reshape(2, 32)
    masks = [sum(1 << i for i in range(32) if w[i]) for w in warps]
    assert np.array_equal(out["ballot"], np.repeat(np.array(masks, np.uint32), 32))
    assert np.allclose(out["sums"], np.repeat(f.reshape(2, 32).sum(1), 32), rtol=1e-5)
    assert np.array_equal(out["idx3"], np.repeat(f.reshape(2, 32)[:, 3], 32))
    up = f.reshape(2, 32).copy()
    up[:, 1:] = up[:, :-1]
    assert np.array_equal(out["up1"], up.reshape(-1))
    assert list(out["counter"]) == [n, n - 1]
    ft = torch.from_numpy(f)
    assert np.array_equal(out["h"], ft.half().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(out["bf"], ft.bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(out["back"], (ft.half().float() + ft.bfloat16().float()).numpy())


TRANSPOSE = r"""
extern "C" __global__ void reverse_tile(const float* x, float* y) {
    __shared__ float tile[64];
    const int t = threadIdx.x, base = blockIdx.x * 64;
    tile[t] = x[base + t];
    SYNC
    y[base + t] = tile[63 - t];
}
"""


def test_reverse_with_barrier_is_correct():
    x = np.arange(192, dtype=np.float32)
    y = np.zeros_like(x)
    EmuModule(TRANSPOSE.replace("SYNC", "__syncthreads();")).get_function("reverse_tile")((3,), (64,), (x, y))
    assert np.array_equal(y, x.reshape(3, 64)[:, ::-1].reshape(-1))


def _fails(code: str, name: str, grid, block, args, shared_mem: int = 0) -> str:
    with pytest.raises(EmuError) as e:
        EmuModule(code).get_function(name)(grid, block, args, shared_mem=shared_mem)
    return str(e.value)


def test_missing_syncthreads_is_a_race_between_orders():
    x = np.arange(192, dtype=np.float32)
    msg = _fails(TRANSPOSE.replace("SYNC", ""), "reverse_tile", (3,), (64,), (x, np.zeros_like(x)))
    assert "kernel reverse_tile" in msg and "block (" in msg and "thread (" in msg
    assert "differs between the forward and reverse thread orders" in msg and "y" in msg


def test_out_of_bounds_write_names_the_thread():
    code = r"""extern "C" __global__ void copy(const float* x, float* y, int n) {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i <= n) y[i] = x[i < n ? i : 0];  /* off by one */
    }"""
    x = np.ones(100, np.float32)
    msg = _fails(code, "copy", (4,), (32,), (x, np.zeros_like(x), np.int32(100)))
    assert msg.startswith("kernel copy, block (3,0,0), thread (4,0,0): out-of-bounds write")
    assert "argument 1 (y)" in msg


def test_wrong_argument_count_and_scalar_size():
    code = r"""extern "C" __global__ void scale(float* y, float a, int n) {
        const int i = threadIdx.x; if (i < n) y[i] *= a; }"""
    y = np.ones(8, np.float32)
    msg = _fails(code, "scale", (1,), (8,), (y, np.float32(2)))
    assert "kernel scale" in msg and "2 arguments" in msg and "has 3" in msg
    msg = _fails(code, "scale", (1,), (8,), (y, np.float32(2), np.int64(8)))
    assert "kernel scale: argument 2 (int n) needs int32 (4 bytes), got int64" in msg
    msg = _fails(code, "scale", (1,), (8,), (y, 2.0, np.int32(8)))  # CuPy would pass a double
    assert "argument 1 (float a) needs float32" in msg
    msg = _fails(code, "scale", (1,), (8,), (y.astype(np.float64), np.float32(2), np.int32(8)))
    assert "argument 0 (float* y) points to 4-byte values" in msg
    assert msg.endswith("[every block, every thread: the launch itself is wrong]")


def test_barrier_after_early_return_deadlocks():
    code = r"""extern "C" __global__ void early(float* y, int n) {
        __shared__ float s[64];
        const int t = threadIdx.x;
        if (t >= n) return;
        s[t] = (float)t;
        __syncthreads();
        y[t] = s[n - 1 - t];
    }"""
    msg = _fails(code, "early", (1,), (64,), (np.zeros(64, np.float32), np.int32(40)))
    assert "kernel early, block (0,0,0), thread (" in msg
    assert "waiting at __syncthreads" in msg and "barrier after an early return" in msg


def test_shuffle_with_exited_lanes():
    code = r"""extern "C" __global__ void half_warp(float* y) {
        const int lane = threadIdx.x;
        if (lane >= 16) return;
        y[lane] = __shfl_down_sync(0xffffffffu, y[lane], 1);
    }"""
    msg = _fails(code, "half_warp", (1,), (32,), (np.zeros(32, np.float32),))
    assert "kernel half_warp, block (0,0,0), thread (" in msg and "exited" in msg


def test_dynamic_shared_memory_overflow():
    code = r"""extern "C" __global__ void stage(const float* x, float* y) {
        extern __shared__ float buf[];
        buf[threadIdx.x] = x[threadIdx.x];
        __syncthreads();
        y[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
    }"""
    x = np.arange(32, dtype=np.float32)
    y = np.zeros_like(x)
    EmuModule(code).get_function("stage")((1,), (32,), (x, y), shared_mem=128)
    assert np.array_equal(y, x[::-1])
    msg = _fails(code, "stage", (1,), (32,), (x, y), shared_mem=64)
    assert msg.startswith("kernel stage, block (0,0,0), thread (16,0,0)") and "dynamic shared memory" in msg


def test_launch_limits_of_real_gpus():
    code = r"""extern "C" __global__ void nop(float* y) { y[0] = 1.f; }"""
    y = np.zeros(1, np.float32)
    assert "not a valid CUDA block" in _fails(code, "nop", (1,), (1025,), (y,))
    assert "not a valid CUDA grid" in _fails(code, "nop", (1, 70000), (1,), (y,))
    assert "48 KiB" in _fails(code, "nop", (1,), (1,), (y,), shared_mem=64 * 1024)


def test_half_arithmetic_rounds_like_cuda():
    code = r"""
    #include <cuda_fp16.h>
    extern "C" __global__ void hmul(const __half* a, const __half* b, __half* c) {
        const int i = threadIdx.x; c[i] = a[i] * b[i] + a[i]; }"""
    a, b = (torch.randn(32, generator=torch.Generator().manual_seed(s)).half() for s in (1, 2))
    c = np.zeros(32, np.float16)
    EmuModule(code).get_function("hmul")((1,), (32,), (a.numpy(), b.numpy(), c))
    assert np.array_equal(c, (a * b + a).numpy())


def test_project_gemm_without_its_second_barrier_is_caught():
    """Mutate the real cuda/gemm.cu: without the barrier that keeps the next tile from being
    staged while others still read this one, the orders disagree (so the barrier is needed,
    and the emulator would notice it missing)."""
    from cuda_emu.fixtures import random_qweight
    from gguf import GGMLQuantizationType as Q
    from mistralrs_cli.backends import cupy_backend as cb

    src = (cb.CUDA_DIR / "gemm.cu").read_text()
    barrier = "__syncthreads();  // the next step overwrites"
    assert src.count(barrier) == 1
    launcher = EmuLauncher(src.replace(barrier, "// removed: "), cb.kernel_options())
    w = random_qweight(Q.Q8_0, 9, 96, seed=2)
    x = torch.randn(12, 96, generator=torch.Generator().manual_seed(2))
    with pytest.raises(EmuError, match=r"kernel gemm_q8_0_f32, block \(0,0,0\), thread \(\d+,\d+,0\): argument 2 \(y\)"):
        cb.CupyBackend(launcher).qmatmul(x, w)


def test_dynamic_shared_declarations_become_launch_pointers():
    from cuda_emu.build import rewrite

    assert rewrite("extern __shared__ float smem[];") == "float* smem = (float*)::emu::dyn_smem();"
    assert rewrite("extern __shared__ __align__(16) unsigned char raw [ ];") == \
        "unsigned char* raw = (unsigned char*)::emu::dyn_smem();"
