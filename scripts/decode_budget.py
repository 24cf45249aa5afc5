#!/usr/bin/env python3
"""Where a decode token's time goes, and how fast decode could be on this machine.

For each real model (SmolLM2 Q4_1, Gemma-3 Q4_K_M) at bench.py's short context:
  bytes     the weight bytes one decode token streams (our repacked arrays; the GGUF blocks, as
            llama.cpp reads them) and its KV-cache bytes (f16, every layer, Gemma-3's sliding
            layers their window)
  memory    a STREAM-like read of this machine: a C loop (cc -O3 -march=native -fopenmp, as the
            native build) summing 256-bit loads over a 1 GiB huge-page buffer, 1 and N threads,
            best of several passes; also over a buffer the size of the model's weights
  ceiling   bytes per token / read bandwidth: the decode tok/s no kernel can beat, and the ratio
            to llama.cpp's measured decode that ceiling allows
  achieved  our decode (the CLI, as bench.py runs it) and llama.cpp's (llama-cpp-python in the
            peers venv), tok/s and the GB/s that means: medians of --repeats, interleaved
  kernels   one thread's decode kernels, GB/s from L2 (layer 0 repeated) and from memory
  split     our decode step in-process, from the kernels' timers (a build with -DNATIVE_PROF,
            which MISTRALRS_CLI_NATIVE_PROF=1 selects; the ordinary build has none): per
            projection its wall, the threads' kernel time, the rounding of the activations
            before it, the epilogue and the rest (fork/join, barriers, imbalance); rope, KV
            stores, attention; the output head; Python around the C calls; and the engine
            (the CLI's time per token less the in-process step).

  prefill   (--prefill) one prefill of the same prompt instead, in-process on --threads, the
            engine's prefix cache off (with it on, a repeated prompt is served from the cache and
            a "prefill" computes one row): per numerics (comma list), rounds interleaved, medians
            of the process CPU time and of the same timers; per projection its weights' types and
            the integer products per second of its kernels (precise: two 8-bit slots per row)

  python scripts/decode_budget.py [--models smollm2,gemma3] [--repeats 3] [--steps 64] [--threads 2]
                                  [--numerics precise|fast]    (--repeats 0: the split alone)
  python scripts/decode_budget.py --prefill [--rounds 5] [--threads 1] [--numerics precise,fast]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MISTRALRS_CLI_NATIVE_PROF", "1")  # before the project loads its kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the same runs, prompt and peers)

import numpy as np  # noqa: E402

STREAM_C = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <sys/mman.h>
void *big(int64_t n) {
    void *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    madvise(p, n, MADV_HUGEPAGE);
    for (int64_t i = 0; i < n; i += 4096) ((char *)p)[i] = (char)i;
    return p;
}
// the bytes read, summed as 256-bit integer lanes (4 accumulators, so loads are the limit)
double read_pass(const void *p, int64_t n, int threads) {
    double t0 = omp_get_wtime();
    int64_t tot = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : tot) schedule(static)
    for (int64_t c = 0; c < n / 65536; c++) {
        const __m256i *q = (const __m256i *)((const char *)p + c * 65536);
        __m256i a = _mm256_setzero_si256(), b = a, d = a, e = a;
        for (int i = 0; i < 2048; i += 4) {
            a = _mm256_add_epi64(a, q[i]); b = _mm256_add_epi64(b, q[i + 1]);
            d = _mm256_add_epi64(d, q[i + 2]); e = _mm256_add_epi64(e, q[i + 3]);
        }
        a = _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(d, e));
        tot += _mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3);
    }
    volatile int64_t sink = tot;
    (void)sink;
    return omp_get_wtime() - t0;
}
"""


def stream(sizes: list[int], threads: int, passes: int = 7) -> dict:
    """Read GB/s per (size, thread count): the best pass (the machine is shared)."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "s.c").write_text(STREAM_C)
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp / "s.so"),
                    str(tmp / "s.c")], check=True)
    so = ctypes.CDLL(str(tmp / "s.so"))
    so.big.restype, so.big.argtypes = ctypes.c_void_p, [ctypes.c_int64]
    so.read_pass.restype, so.read_pass.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    out = {}
    for n in sizes:
        n = n // 65536 * 65536
        p = so.big(n)
        for th in sorted({1, threads}):
            so.read_pass(p, n, th)
            out[(n, th)] = max(n / so.read_pass(p, n, th) for _ in range(passes)) / 1e9
    return out


def weight_bytes(model) -> tuple[int, int, dict]:
    """(our bytes per token, the GGUF's bytes of the same tensors, ours by role)."""
    roles = {"qkv": 0, "o": 0, "gu": 0, "down": 0}
    for L in model.layers:
        for role, plan in (("qkv", L.qkv), ("o", L.o), ("gu", L.gate_up), ("down", L.down)):
            roles[role] += sum(t.nbytes for t in plan.tensors)
    roles["head"] = sum(t.nbytes for t in model.head.tensors)
    t = model.gf.tensors
    names = [n for n in t if n.startswith("blk.") and any(f".{x}.weight" in n for x in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))]
    names.append("output.weight" if "output.weight" in t else "token_embd.weight")
    return sum(roles.values()), sum(t[n].nbytes for n in names), roles


def kv_bytes(model, ctx: int) -> int:
    """f16 keys and values one decode token reads at context ctx."""
    per = 2 * model.nkv * model.hd * 2
    return sum(per * (min(ctx, L.window) if L.window else ctx) for L in model.layers)


ROLES = ["head", "qkv", "o", "gu", "down", "rope", "kv_store", "attention", "layers"]


class _Fixed:
    """A thread policy that always picks n (native_threads.ThreadPolicy may pick one thread on a
    busy machine; the split is for a fixed count)."""

    def __init__(self, n: int):
        self.n = n

    def pick(self, rows: int) -> int:
        return self.n

    def start(self):
        return None

    def record(self, *a) -> None:
        pass


def split(path: Path, prompt: str, steps: int, threads: int, numerics: str) -> tuple[dict, object, int]:
    """Per-token seconds by phase over `steps` greedy decode steps after the prompt, run by the
    engine in-process (api.Runner.stream, the CLI's path), each model step timed."""
    from mistralrs_cli.api import Runner, Which
    from mistralrs_cli.backends import native
    from mistralrs_cli.types import SamplingParams

    native.set_threads(threads)
    runner = Runner(Which.GGUF(str(path.parent), path.name), token_source="none", numerics=numerics)
    model, lib = runner.loaded.model, native.library()
    model.pool = _Fixed(threads)
    buf = (ctypes.c_double * 72)()
    if lib.native_prof(None, 1) == 0:
        raise SystemExit("the kernels were built without timers (MISTRALRS_CLI_NATIVE_PROF unset?)")
    step, calls = model.step, []  # (rows, start, end) per model step

    def timed(ids, *a, **kw):
        if len(ids) == 1 and calls and calls[-1][0] > 1:
            lib.native_prof(None, 1)  # the prompt is done: time the decode steps alone
        t0 = time.perf_counter()
        try:
            return step(ids, *a, **kw)
        finally:
            calls.append((len(ids), t0, time.perf_counter()))

    model.step = timed
    ids = runner.loaded.tokenizer.encode(prompt)
    for _ in runner.stream(ids, SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)):
        pass
    lib.native_prof(buf, 1)
    dec = [c for c in calls if c[0] == 1]
    n = len(dec)
    acc = np.frombuffer(buf, dtype=np.float64).reshape(9, 8) / n
    walls = [e - s for _, s, e in dec]
    out = {"step": sum(walls) / n, "step_median": statistics.median(walls),
           "engine": statistics.median(b[1] - a[2] for a, b in zip(dec, dec[1:]))}
    for i, role in enumerate(ROLES):
        calls_, wall, prep, busy, busy_max, epi, nt, wait = acc[i]
        out[role] = {"wall": wall, "prep": prep, "busy": busy / max(nt / max(calls_, 1e-9), 1), "busy_max": busy_max,
                     "epi": epi, "calls": calls_}
    out["python"] = out["step"] - out["layers"]["wall"] - out["head"]["wall"]
    return out, model, len(ids)


def kernel_rates(model, passes: int = 7) -> dict:
    """GB/s of one thread's 16-bit decode kernels (thread CPU time, best of `passes`): layer 0's
    weights repeated (from L2: what the instructions allow) and every layer's once (from memory)."""
    from mistralrs_cli.backends import native

    out = {}
    for role in ("qkv", "gate_up", "down"):
        plans = [getattr(L, role) for L in model.layers]
        opts = [getattr(L, role + "_opts") for L in model.layers]
        k = model.layers[0].gate_up.rows if role == "down" else model.config.hidden_size
        x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)
        for where, ps, os_ in (("L2", plans[:1] * 100, opts[:1] * 100), ("memory", plans, opts)):
            best = float("inf")
            for _ in range(passes):
                t0 = time.thread_time()
                for p, o in zip(ps, os_):
                    native.qmatmul(x, p, model.lib, o, n_threads=1)
                best = min(best, time.thread_time() - t0)
            out[(role, where)] = sum(sum(t.nbytes for t in p.tensors) for p in ps) / best / 1e9
    return out


def cli_runs(key: str, path: Path, repeats: int, threads: int) -> dict:
    """Decode tok/s of our CLI and of llama.cpp, runs interleaved, medians and spreads."""
    args = bench.parse_args(["--threads", str(threads)])
    prompt = (bench.PROMPT, 0)
    got = {"ours": [], "llama.cpp": []}
    saved = os.environ.pop("MISTRALRS_CLI_NATIVE_PROF", None)  # the CLI runs its ordinary build
    try:
        for _ in range(repeats):
            for engine in got:
                r = bench.one_run(engine, key, path, prompt, args)
                if "error" in r:
                    print(f"# {engine} {key}: {r['error'][-600:]}", file=sys.stderr)
                else:
                    got[engine].append(r["decode_tps"])
    finally:
        if saved is not None:
            os.environ["MISTRALRS_CLI_NATIVE_PROF"] = saved
    return got


def report(key: str, path: Path, bw: dict, args) -> None:
    sp, model, n_prompt = split(path, bench.PROMPT, args.steps, args.threads, args.numerics)
    ctx = n_prompt + args.steps // 2
    ours_w, gguf_w, roles = weight_bytes(model)
    kv = kv_bytes(model, ctx)
    read_bw = max(v for (n, th), v in bw.items() if th == args.threads)
    runs = cli_runs(key, path, args.repeats, args.threads) if args.repeats else {"ours": [], "llama.cpp": []}
    med = {e: statistics.median(v) if v else float("nan") for e, v in runs.items()}
    mb = lambda b: b / 1e6  # noqa: E731
    print(f"\n## {bench.MODELS[key]['label']} (context ~{ctx}: {n_prompt}-token prompt, {args.steps} new)\n")
    print(f"- bytes per decode token: weights {mb(ours_w):.1f} MB ours ({mb(gguf_w):.1f} MB as GGUF blocks, "
          f"llama.cpp's), KV {mb(kv):.2f} MB; by projection (ours): "
          + ", ".join(f"{r} {mb(b):.1f}" for r, b in roles.items()))
    for e, own in (("ours", ours_w), ("llama.cpp", gguf_w)):
        v = runs[e]
        spread = f"{min(v):.1f}-{max(v):.1f}" if v else "-"
        print(f"- {e} decode: {med[e]:.1f} tok/s (runs {spread}) = {med[e] * (own + kv) / 1e9:.1f} GB/s")
    ceiling = read_bw * 1e9 / (ours_w + kv)
    print(f"- read bandwidth {read_bw:.1f} GB/s ({args.threads} threads) -> ceiling {ceiling:.0f} tok/s "
          f"(ours now at {med['ours'] / ceiling:.0%} of it); the ratio to llama.cpp it allows: "
          f"{ceiling / med['llama.cpp']:.2f}x (bar 1.5x); ours now {med['ours'] / med['llama.cpp']:.2f}x")
    need = 1.5 * med["llama.cpp"]
    print(f"- 1.5x llama.cpp is {need:.0f} tok/s: {need * (ours_w + kv) / 1e9:.1f} GB/s of our bytes "
          f"({need * (ours_w + kv) / 1e9 / read_bw:.0%} of the read bandwidth; with llama.cpp's bytes "
          f"{need * (gguf_w + kv) / 1e9 / read_bw:.0%})")
    head = roles["head"] / (ours_w + kv)
    print(f"- the output head alone is {head:.0%} of the bytes: at the read bandwidth it takes "
          f"{roles['head'] / read_bw / 1e6:.2f} ms a token")
    rates = kernel_rates(model)
    print("- one thread's decode kernels (thread CPU time, best of 7), GB/s from L2 / from memory: "
          + ", ".join(f"{r} {rates[(r, 'L2')]:.1f} / {rates[(r, 'memory')]:.1f}" for r in ("qkv", "gate_up", "down")))
    step, ms = sp["step"], lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    print(f"\nIn-process decode step (the profiling build, {args.threads} threads): {ms(step)} ms mean, "
          f"{ms(sp['step_median'])} median; the CLI's {1e3 / med['ours']:.3f} ms a token\n")
    print("| phase | ms/token | share | kernels (avg thread) | slowest thread | rounding + fork | epilogue | "
          "rest: barriers, join, imbalance | kernel GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for role in ("qkv", "o", "gu", "down", "head"):
        r = sp[role]
        rest = r["wall"] - r["prep"] - r["busy"] - r["epi"]
        gbs = roles[role] / r["busy_max"] / 1e9 if r["busy_max"] else float("nan")
        print(f"| {role} | {ms(r['wall'])} | {r['wall'] / step:.0%} | {ms(r['busy'])} | {ms(r['busy_max'])} | "
              f"{ms(r['prep'])} | {ms(r['epi'])} | {ms(rest)} | {gbs:.1f} |")
    for role in ("rope", "kv_store", "attention"):
        r = sp[role]
        print(f"| {role} | {ms(r['wall'])} | {r['wall'] / step:.0%} | | | | | | |")
    c_sum = sum(sp[r]["wall"] for r in ("qkv", "o", "gu", "down", "rope", "kv_store", "attention"))
    print(f"| decoder_layers, other | {ms(sp['layers']['wall'] - c_sum)} | "
          f"{(sp['layers']['wall'] - c_sum) / step:.0%} | | | | | | |")
    print(f"| Python around the C calls | {ms(sp['python'])} | {sp['python'] / step:.0%} | | | | | | |")
    print(f"| engine between steps (sampler, streaming; median) | {ms(sp['engine'])} | "
          f"{sp['engine'] / step:.0%} | | | | | | |")


TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K", 0: "F32", 1: "F16", 30: "BF16"}


def prefill_split(key: str, path: Path, args) -> None:
    """The prompt's prefill per numerics: process CPU ms (medians over --rounds, interleaved) and
    the timers' split (medians per field)."""
    from mistralrs_cli.api import Runner, Which
    from mistralrs_cli.backends import native
    from mistralrs_cli.types import EngineConfig, SamplingParams

    native.set_threads(args.threads)
    nums = [n.strip() for n in args.numerics.split(",") if n.strip()]
    runners = {n: Runner(Which.GGUF(str(path.parent), path.name), token_source="none", numerics=n,
                         engine_config=EngineConfig(prefix_cache_n=0)) for n in nums}
    lib = native.library()
    if lib.native_prof(None, 1) == 0:
        raise SystemExit("the kernels were built without timers (MISTRALRS_CLI_NATIVE_PROF unset?)")
    ids = runners[nums[0]].loaded.tokenizer.encode(bench.PROMPT)
    got = {n: [] for n in nums}  # (cpu seconds, timers) per round
    for _ in range(args.rounds):
        for n, runner in runners.items():
            model = runner.loaded.model
            model.pool, step = _Fixed(args.threads), model.step

            def timed(ids_, *a, _step=step, _n=n, **kw):
                if len(ids_) == 1:
                    return _step(ids_, *a, **kw)
                lib.native_prof(None, 1)
                t0 = time.process_time()
                out = _step(ids_, *a, **kw)
                cpu, buf = time.process_time() - t0, (ctypes.c_double * 72)()
                lib.native_prof(buf, 1)
                got[_n].append((cpu, np.frombuffer(buf, dtype=np.float64).reshape(9, 8).copy()))
                return out

            model.step = timed
            try:
                for _ in runner.stream(ids, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)):
                    pass
            finally:
                model.step = step
    model = runners[nums[0]].loaded.model
    L0, d = model.layers[0], model.config.hidden_size
    plans = {"qkv": (L0.qkv, d), "o": (L0.o, model.nq * model.hd), "gu": (L0.gate_up, d),
             "down": (L0.down, L0.gate_up.rows // 2), "head": (model.head, d)}
    print(f"\n## {bench.MODELS[key]['label']}: prefill of {len(ids)} tokens, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.2f}, medians of {args.rounds} interleaved rounds\n")
    for n in nums:
        cpu = statistics.median(c for c, _ in got[n])
        acc = np.median(np.stack([a for _, a in got[n]]), axis=0)
        print(f"{n}: {cpu * 1e3:.1f} CPU ms = {len(ids) / cpu:.0f} tok/s per CPU second; the timers (ms):\n")
        print("| phase | weight types | wall | rounding + prologue | kernels (thread sum) | epilogue | rest (wall less "
              "the average thread's kernels) | G int products/s per thread |")
        print("|---|---|---|---|---|---|---|---|")
        for i, role in enumerate(ROLES):
            calls, wall, prep, busy, _, epi, nt, _ = acc[i]
            per = busy / max(nt / max(calls, 1e-9), 1)  # the average thread's kernel time
            if role in plans:
                plan, k = plans[role]
                types = [[TYPE_NAMES.get(e.type & 0xff, e.type & 0xff), e.rows, 1] for e in plan.array]
                for i_ in range(len(types) - 1, 0, -1):  # a run of one type (the head's slices): one entry
                    if types[i_][0] == types[i_ - 1][0] and role == "head":
                        types[i_ - 1][1:] = [types[i_ - 1][1] + types[i_][1], types[i_ - 1][2] + types[i_][2]]
                        del types[i_]
                types = "+".join(f"{t}x{r}" + (f" ({c} parts)" if c > 1 else "") for t, r, c in types)
                rows = 1 if role == "head" else len(ids)  # the head: the last row only
                slots = 2 * rows if n == "precise" else rows
                macs = slots * plan.rows * k * (calls if role != "head" else 1)
                print(f"| {role} | {types} | {wall * 1e3:.1f} | {prep * 1e3:.1f} | {busy * 1e3:.1f} | {epi * 1e3:.1f} | "
                      f"{(wall - prep - per - epi) * 1e3:.1f} | {macs / busy / 1e9 if busy else float('nan'):.0f} |")
            else:
                print(f"| {role} | | {wall * 1e3:.1f} | | | | | |")
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numerics", default="precise", help="of the in-process split (the CLI runs its default)")
    ap.add_argument("--prefill", action="store_true", help="the prefill split instead (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="--prefill's interleaved rounds")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    paths = {k: bench.CACHE / "models" / bench.MODELS[k]["file"] for k in keys}
    if args.prefill:
        for k in keys:
            prefill_split(k, paths[k], args)
        return
    sizes = [1 << 30] + [p.stat().st_size for p in paths.values()]
    bw = stream(sizes, args.threads)
    print(f"# load average {os.getloadavg()[0]:.2f}; STREAM-like read, best of 7 passes:")
    for (n, th), v in sorted(bw.items()):
        print(f"#   {n / 1e6:.0f} MB, {th} thread(s): {v:.1f} GB/s")
    for k in keys:
        report(k, paths[k], bw, args)


if __name__ == "__main__":
    main()
