#!/usr/bin/env python3
"""This CPU's multiply throughput on one core: a C loop of 12 independent AVX-512 `vpdpbusd`
(int8 products into int32, 64 per instruction) and one of 12 independent `vfmadd` (f32, 16 per
instruction), compiled as the native kernels are (cc -O2 -march=native). Prints instructions and
products per second: the ceiling the integer kernels (backends/csrc/packed.c) are measured against
in README's "The latest run". Needs AVX-512 VNNI.

    python scripts/cpu_peak.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

SRC = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#define R(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(void) {
    const long n = 100000000;
#define D(i) __m512i a##i = _mm512_set1_epi32(i);
    R(D)
    const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
    double t0 = now();
    for (long it = 0; it < n; it++) {
#define S(i) a##i = _mm512_dpbusd_epi32(a##i, x, y);
        R(S)
    }
    double s = now() - t0;
    __m512i z = a0;
#define Z(i) z = _mm512_add_epi32(z, a##i);
    R(Z)
    printf("vpdpbusd zmm: %.2f G instructions/s = %.1f G int8 products/s (%d)\n", n * 12 / s / 1e9,
           n * 12 * 64 / s / 1e9, _mm512_reduce_add_epi32(z) & 1);
#define F(i) __m512 f##i = _mm512_set1_ps((float)i);
    R(F)
    const __m512 fa = _mm512_set1_ps(1.0001f), fb = _mm512_set1_ps(0.9999f);
    t0 = now();
    for (long it = 0; it < n; it++) {
#define G(i) f##i = _mm512_fmadd_ps(f##i, fa, fb);
        R(G)
    }
    s = now() - t0;
    __m512 fz = f0;
#define H(i) fz = _mm512_add_ps(fz, f##i);
    R(H)
    printf("vfmadd zmm:   %.2f G instructions/s = %.1f G f32 multiply-adds/s (%d)\n", n * 12 / s / 1e9,
           n * 12 * 16 / s / 1e9, _mm512_reduce_add_ps(fz) > 0);
    return 0;
}
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SRC)
        built = subprocess.run(["cc", "-O2", "-march=native", "-o", str(exe), str(src)], capture_output=True, text=True)
        if built.returncode != 0:
            print(f"error: this CPU or compiler has no AVX-512 VNNI: {built.stderr.strip()[:200]}", file=sys.stderr)
            return 1
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    sys.exit(main())
