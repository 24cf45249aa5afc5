"""Micro-benchmark of the native int8 GEMM (csrc/qmatmul.c + packed.c) on real model tensors.

Builds two libraries in this process: "base" from the C sources at a git revision (default
HEAD) and "new" from the working tree (cc -O3 -march=native -fopenmp, as backends/native.py
builds them), repacks the weights with each library's repack8 / repack8_k as native.Plan does,
then times qmm_parts (what native.qmatmul calls) on the same weights and activations with each, interleaved (base, new, base, new, ...), and reports medians in ms and
GFLOP/s (2 * M * N * K / time) per shape and M, plus whether the outputs are bit-identical.

    python scripts/bench_qmm.py [--m 1,16,200] [--threads 1] [--iters 15] [--base HEAD]
                                [--model smol|gemma|all] [--cpu-time] [--precise] [--only lm_head] [--min]

--cpu-time reports process CPU time instead of wall time (steadier on a shared machine; only
meaningful with --threads 1). Shapes: SmolLM2-135M Q4_1 (layer 0: qkv, o, gate+up, down, the
Q8_0 lm_head) and Gemma-3-270M Q4_K_M (q/k/v, o, gate+up, down of a Q6_K and a Q4_K layer, the
Q8_0 lm_head: 262144 x 640, the largest weight of either model); the
"silu+down" / "gelu+down" rows include the fused gated activation of the down projection's input.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ctypes
import hashlib
import mmap

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader

# self-contained (no import of backends/native.py, which is edited by others): the same build
# flags and the same ctypes calls
CSRC = Path(__file__).resolve().parent.parent / "mistralrs_cli" / "backends" / "csrc"
SOURCES = ("qmatmul.c", "packed.c", "attention.c", "decoder.c", "lora.c", "floatmm.c", "quantize.c")  # as native.py builds
HEADERS = ("attention.h",)
PACKED = 0x100


class QPart(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("rows", ctypes.c_int64), ("w", ctypes.c_void_p)]


class QmmOpts(ctypes.Structure):  # csrc/qmatmul.c's qmm_opts
    _fields_ = [("norm_w", ctypes.c_void_p), ("norm_eps", ctypes.c_float), ("act", ctypes.c_int),
                ("bias", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("ld_res", ctypes.c_int64),
                ("post_w", ctypes.c_void_p), ("post_eps", ctypes.c_float), ("precise", ctypes.c_int),
                ("lora", ctypes.c_void_p)]


def compile_lib(src_dir: Path, out_dir: Path) -> ctypes.CDLL:
    srcs = [src_dir / s for s in SOURCES]
    ident = hashlib.sha256(b"".join(p.read_bytes() for p in srcs)).hexdigest()[:16]
    out = out_dir / f"bench-{ident}.so"
    if not out.exists():
        subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                        *map(str, srcs), "-lm"], check=True)
    so = ctypes.CDLL(str(out))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    so.qmm_parts.restype = i32
    so.qmm_parts.argtypes = [ptr, i32, i64, ptr, i64, i64, ptr, i64, i32, ptr]
    so.repack8.restype = so.packed_supported.restype = so.packed_block_bytes.restype = i32
    so.repack8.argtypes = so.repack8_k.argtypes = [i32, ptr, i64, i64, ptr]
    so.repack8_k.restype = so.packed_k_block_bytes.restype = i32
    so.packed_k_block_bytes.argtypes = so.packed_supported.argtypes = so.packed_block_bytes.argtypes = [i32]
    return so


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def huge_buffer(nbytes: int) -> np.ndarray:
    """An anonymous mapping with transparent huge pages requested, as native.py's arena does
    for packed weights (fewer TLB misses when a big weight streams through)."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mm, dtype=np.uint8)


class Plan:
    """native.Plan's repacking: 8-row groups where the library packs the type."""

    def __init__(self, parts, lib):
        self.keep, entries = [], []
        for raw, qtype, rows in parts:
            code = int(qtype)
            block, size = GGML_QUANT_SIZES[qtype]
            k = raw.shape[1] // size * block
            t = raw
            if lib.packed_supported(code):
                repack, per_block = lib.repack8, lib.packed_block_bytes(code)
            elif lib.packed_k_block_bytes(code):
                repack, per_block = lib.repack8_k, lib.packed_k_block_bytes(code)
            else:
                repack = None
            if repack is not None:
                packed = huge_buffer((rows + 7) // 8 * (k // block) * per_block + 64)
                if repack(code, _ptr(raw), rows, k, _ptr(packed)) == 0:
                    t, code = packed, code | PACKED
            self.keep.append(t)
            entries.append(QPart(code, rows, _ptr(t)))
        self.array = (QPart * len(entries))(*entries)
        self.count, self.rows = len(entries), sum(p[2] for p in parts)


def qmatmul(x: np.ndarray, plan: Plan, lib, threads: int, out: np.ndarray | None = None, act: int = 0,
            precise: bool = False) -> np.ndarray:
    """act: 0 none, 1 silu(gate) * up, 2 gelu_tanh(gate) * up (x is then [gate | up], 2k wide);
    precise: --numerics precise's activations (qmm_opts.precise)"""
    m, k = x.shape[0], x.shape[1] // (2 if act else 1)
    y = np.empty((m, plan.rows), np.float32) if out is None else out
    opts = ctypes.byref(QmmOpts(act=act, precise=int(precise))) if act or precise else None
    rc = lib.qmm_parts(plan.array, plan.count, k, _ptr(x), x.shape[1], m, _ptr(y), plan.rows, threads, opts)
    assert rc == 0, rc
    return y

MODELS = Path.home() / ".cache" / "mistralrs-cli" / "models"
REPO = Path(__file__).resolve().parent.parent


def tensors(path: Path) -> dict:
    r = GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if t.tensor_type.name == "F32":
            continue
        rows = int(t.shape[1])
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1)
        out[t.name] = (raw, t.tensor_type, rows, int(t.shape[0]))
    return out


def shapes(which: str):
    out = []
    if which in ("smol", "all"):
        t = tensors(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")
        b = "blk.0."
        out += [("smol qkv", [t[b + n] for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")]),
                ("smol o", [t[b + "attn_output.weight"]]),
                ("smol gate+up", [t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]]),
                ("smol down", [t[b + "ffn_down.weight"]]),
                ("smol silu+down", [t[b + "ffn_down.weight"]], 1),
                ("smol lm_head", [t["token_embd.weight"]])]
    if which in ("gemma", "all"):
        t = tensors(MODELS / "gemma-3-270m-q4_k_m.gguf")
        # a layer whose v is Q8_0 and down Q6_K, and one whose down is Q4_K
        l6 = next(i for i in range(18) if t[f"blk.{i}.ffn_down.weight"][1].name == "Q6_K")
        l4 = next(i for i in range(18) if t[f"blk.{i}.ffn_down.weight"][1].name == "Q4_K")
        lv = next(i for i in range(18) if t[f"blk.{i}.attn_v.weight"][1].name == "Q8_0")
        out += [("gemma q+k (Q5_0)", [t[f"blk.{lv}.{n}"] for n in ("attn_q.weight", "attn_k.weight")]),
                ("gemma v (Q8_0)", [t[f"blk.{lv}.attn_v.weight"]]),
                ("gemma o (Q4_K)", [t[f"blk.{lv}.attn_output.weight"]]),
                ("gemma gate+up (Q5_0)", [t[f"blk.{lv}.{n}"] for n in ("ffn_gate.weight", "ffn_up.weight")]),
                ("gemma down (Q6_K)", [t[f"blk.{l6}.ffn_down.weight"]]),
                ("gemma down (Q4_K)", [t[f"blk.{l4}.ffn_down.weight"]]),
                ("gemma gelu+down (Q6_K)", [t[f"blk.{l6}.ffn_down.weight"]], 2),
                ("gemma lm_head", [t["token_embd.weight"]])]
    if which == "llava":  # LLaVA-1.5-7B's text layers (scripts/bench_vision.py --shape llava15 --isq Q4K):
        # random Q4_K blocks with finite scales, as tests/gguf_builder.random_blocks makes them
        sys.path.insert(0, str(REPO / "tests"))
        import gguf_builder as gb
        from gguf import GGMLQuantizationType as Q

        def q4k(n, k, seed):
            return (gb.random_blocks((n, k), Q.Q4_K, seed=seed), Q.Q4_K, n, k)
        out += [("llava qkv (Q4_K)", [q4k(4096, 4096, 1), q4k(4096, 4096, 2), q4k(4096, 4096, 3)]),
                ("llava o (Q4_K)", [q4k(4096, 4096, 4)]),
                ("llava gate+up (Q4_K)", [q4k(11008, 4096, 5), q4k(11008, 4096, 6)]),
                ("llava silu+down (Q4_K)", [q4k(4096, 11008, 7)], 1)]
    return out


def build_at(rev: str):
    """The library from the C sources as committed at `rev`."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_qmm_"))
    for name in SOURCES + HEADERS:
        rel = (CSRC / name).relative_to(REPO)
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True, check=True).stdout
        (tmp / name).write_bytes(text)
    return compile_lib(tmp, tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16,200")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--base", default="HEAD", help="git revision of the baseline sources ('' for none)")
    ap.add_argument("--model", default="all", choices=["smol", "gemma", "all", "llava"])
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--precise", action="store_true", help="time --numerics precise's activations")
    ap.add_argument("--only", default="", help="only the shapes whose label contains this (e.g. lm_head)")
    ap.add_argument("--min", action="store_true", help="report the minimum time instead of the median "
                    "(steadier on a shared machine)")
    args = ap.parse_args()
    libs = {}
    if args.base:
        libs["base"] = build_at(args.base)
    libs["new"] = compile_lib(CSRC, Path(tempfile.mkdtemp(prefix="bench_qmm_")))
    clock = time.process_time if args.cpu_time else time.perf_counter
    ms = [int(v) for v in args.m.split(",")]
    totals = {(name, m): 0.0 for name in libs for m in ms}
    print(f"threads={args.threads} iters={args.iters} clock={'cpu' if args.cpu_time else 'wall'} base={args.base} "
          f"{'min' if args.min else 'median'} precise={args.precise}")
    stat = min if args.min else statistics.median
    for label, parts, *act in shapes(args.model):
        if args.only not in label:
            continue
        act = act[0] if act else 0
        k = parts[0][3]
        n = sum(p[2] for p in parts)
        plans = {name: Plan([(raw, q, rows) for raw, q, rows, _ in parts], lib) for name, lib in libs.items()}
        for m in ms:
            x = (np.random.default_rng(m).standard_normal((m, k * (2 if act else 1))) * 2).astype(np.float32)
            outs = {name: qmatmul(x, plans[name], lib, args.threads, act=act, precise=args.precise) for name, lib in libs.items()}
            iters = max(3, args.iters if m > 1 else args.iters * 4)
            times = {name: [] for name in libs}
            for _ in range(iters):
                for name, lib in libs.items():
                    t0 = clock()
                    qmatmul(x, plans[name], lib, args.threads, out=outs[name], act=act,
                            precise=args.precise)
                    times[name].append(clock() - t0)
            flops = 2.0 * m * n * k
            cells = []
            for name in libs:
                t = stat(times[name])
                totals[(name, m)] += t
                cells.append(f"{name} {t * 1e3:8.3f} ms {flops / t / 1e9:7.1f} GF/s")
            same = ""
            if "base" in outs:
                same = "identical" if np.array_equal(outs["base"], outs["new"]) else \
                    f"DIFFERS max {np.abs(outs['base'] - outs['new']).max():.3g}"
                cells.append(f"x{stat(times['base']) / stat(times['new']):.2f}")
            types = "+".join(sorted({p[1].name for p in parts}))
            print(f"{label:22s} {types:10s} N={n:6d} K={k:5d} M={m:4d} | " + " | ".join(cells) + f" | {same}",
                  flush=True)
    for m in ms:
        print(f"total M={m:4d}: " + " | ".join(f"{name} {totals[(name, m)] * 1e3:8.3f} ms" for name in libs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
