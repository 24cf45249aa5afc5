"""Benchmark the cuda/*.cu kernels on a GPU box.

GEMV (decode, M=1): effective GB/s (weight bytes + activations read, outputs written, per
second) against the card's peak memory bandwidth. GEMM (prefill, M=512): TFLOP/s against torch
doing the same work its own way (dequantize the blocks with the torch reference, then matmul).
Median of --iters timed runs after a warm-up, CUDA events on torch's current stream.

    python scripts/bench_kernels.py [--n 4096] [--k 4096] [--m 512] [--iters 20]

With no usable GPU it says so and exits 0 (nothing to measure).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.quant.dequant import dequantize, row_bytes
from mistralrs_cli.quant.qweight import QWeight


def peak_bandwidth_gbs(cupy) -> float:
    """2 transfers per clock (DDR) x bus width; attributes 36/37: memory clock kHz, bus bits."""
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device().id
    clock_khz, bus_bits = rt.deviceGetAttribute(36, dev), rt.deviceGetAttribute(37, dev)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def timed(fn, iters: int) -> float:
    """Median seconds per call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_weight(qtype, n: int, k: int, device: str = "cuda") -> QWeight:
    """Random block bytes: values do not change a kernel's speed, only its shape does."""
    raw = torch.randint(0, 256, (n, row_bytes(qtype, k)), dtype=torch.uint8, device=device)
    return QWeight(raw, qtype, (n, k))


def bench(backend, qtype, args, bandwidth: float, device: str = "cuda", timer=timed) -> str:
    """One table row. `device` and `timer` are parameters so the tests run this on the CPU
    (the emulator as the backend's launcher, any timer)."""
    w = random_weight(qtype, args.n, args.k, device)
    x1 = torch.randn(1, args.k, device=device)
    t_gemv = timer(lambda: backend.qmatmul(x1, w), args.iters)
    gbs = (w.raw.numel() + 4 * (args.k + args.n)) / t_gemv / 1e9
    xm = torch.randn(args.m, args.k, device=device)
    flops = 2 * args.m * args.n * args.k
    t_gemm = timer(lambda: backend.qmatmul(xm, w), args.iters)
    t_torch = timer(lambda: F.linear(xm, dequantize(w.raw, qtype)), args.iters)
    return (f"{qtype.name:>7} | {gbs:7.1f} GB/s ({100 * gbs / bandwidth:5.1f}% of peak) | "
            f"{flops / t_gemm / 1e12:6.2f} TFLOP/s | torch dequantize+matmul {flops / t_torch / 1e12:6.2f} TFLOP/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="output features (weight rows)")
    p.add_argument("--k", type=int, default=4096, help="input features (a multiple of 256)")
    p.add_argument("--m", type=int, default=512, help="activation rows of the GEMM (prefill tokens)")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    ok, reason = cb.cuda_status()
    if not ok:
        print(f"bench_kernels: no GPU to measure ({reason}); nothing to do.")
        return 0
    cupy = cb._cupy()
    backend = cb.CupyBackend()
    bandwidth = peak_bandwidth_gbs(cupy)
    print(f"{reason}; peak memory bandwidth {bandwidth:.0f} GB/s; N={args.n} K={args.k} M={args.m}")
    print(f"{'type':>7} | GEMV (M=1) | GEMM (M={args.m}) | reference")
    for qtype in cb.KERNEL_TAGS:
        print(bench(backend, qtype, args, bandwidth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
