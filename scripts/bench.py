#!/usr/bin/env python3
"""Side-by-side speed and memory benchmark: this project's CLI against llama.cpp and mistral.rs.

Every run is one fresh OS process, started the way a user would start the engine:
  ours        the installed `mistralrs` CLI (one-shot --prompt mode, default numerics); speeds come
              from its stderr stats line, time to first token from process start is the first
              stdout byte; ours-fast / ours-precise: --numerics fast / precise; ours-1t: 1 thread;
  llama.cpp   llama-cpp-python in the peers venv: load, eval the prompt, greedy argmax per token,
              its defaults (flash attention off); llama.cpp-fa: flash attention on (llama.cpp's
              own CLI and server turn it on for the CPU by default);
  mistral.rs  the PyPI `mistralrs` package in the peers venv: streamed chat request whose chat
              template is the identity (so the model sees exactly the raw prompt), EOS ignored.
All engines get the same raw prompt text (no chat template: Gemma-3's file has none, so raw keeps
the input identical everywhere; BOS follows each model's tokenizer), greedy decoding, --max-tokens
new tokens with EOS ignored, 2 threads. Engines alternate run by run; medians over --repeats runs.
Peak RSS is the child's own ru_maxrss from os.wait4. This script imports nothing from the project.

--contexts: "short" is a fixed ~200-token prompt; a number N is a fixed long text (bench_context.py)
cut so that prompt + new tokens is about N tokens, i.e. decode runs at context ~N (prefill tok/s
is over the whole prompt). --busy-neighbour: a separate process spins on one CPU during every
run, and ours-1t (one thread) runs as the reference right after ours (right before it every other
repeat), so that other work on a shared machine loads the two alike.

  python scripts/bench.py [--repeats 2] [--models smollm2,gemma3] [--engines ours,ours-fast,llama.cpp]
                          [--contexts short,512,2048,8192] [--busy-neighbour] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import bench_context
from bench_peers import LLAMA_RUNNER, MISTRALRS_RUNNER, PEER_PROBES

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MISTRALRS_CLI_CACHE", Path.home() / ".cache" / "mistralrs-cli"))

MODELS = {
    "smollm2": {"label": "SmolLM2-135M Q4_1", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3": {"label": "Gemma-3-270M Q4_K_M", "file": "gemma-3-270m-q4_k_m.gguf"},
}
ENGINES = ["ours", "ours-fast", "ours-precise", "ours-1t", "llama.cpp", "llama.cpp-fa", "mistral.rs"]
DEFAULT_ENGINES = "ours,ours-fast,llama.cpp"
OURS_NUMERICS = {"ours-fast": ["--numerics", "fast"], "ours-precise": ["--numerics", "precise"]}
# Known problems that make a row not comparable; printed beside the row.
KNOWN_BROKEN = {("mistral.rs", "gemma3"): "tokenizer converted wrongly by mistral.rs (prompt token "
                                          "count differs, output is garbage)"}

# ~200 tokens with both tokenizers; fixed so results compare across commits.
PROMPT = (
    "You are reviewing a design document for a small command-line tool that runs language models "
    "on an ordinary laptop. The tool reads a quantized model file, builds the tokenizer from the "
    "metadata stored inside that file, and then generates text one token at a time. The authors "
    "claim three things. First, that loading the model takes less than a second once the file is "
    "in the operating system's page cache. Second, that the prompt is processed in large batches, "
    "so a long question costs little more than a short one. Third, that memory use stays close to "
    "the size of the weights, because nothing is copied or converted to a wider format at load "
    "time. Write a careful review of these claims. For each one, explain how you would measure it, "
    "which numbers you would report, what could make the measurement misleading on a shared "
    "machine, and what result would convince you that the claim holds. Finish with a short list of "
    "questions for the authors about threads, caches and the cost of the first request."
)

STATS_RE = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tok/s \| generated: (\d+) tokens, ([\d.]+) tok/s"
                      r" \| first token after ([\d.]+) s")
RESULT_TAG = "BENCH_RESULT "

def run_process(cmd: list[str], env: dict, timeout: float) -> dict:
    """Spawn cmd, time its first stdout byte, reap it with wait4 for its own peak RSS."""
    t0 = time.time()
    env = dict(env, BENCH_T0=repr(t0))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = [None]
    out, err = bytearray(), bytearray()

    def read_out():
        while True:
            b = p.stdout.read1(65536)
            if not b:
                break
            if first[0] is None:
                first[0] = time.time()
            out.extend(b)

    def read_err():
        err.extend(p.stderr.read())

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    except BaseException:  # Ctrl-C / SIGTERM: do not leave the engine running
        p.kill()
        os.waitpid(p.pid, 0)
        raise
    finally:
        timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(5)
    return {"rc": p.returncode, "wall_s": time.time() - t0, "peak_rss_mb": ru.ru_maxrss / 1024,
            "first_stdout_s": first[0] - t0 if first[0] else None,
            "stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace"),
            "timed_out": time.time() - t0 >= timeout}


def find_cli(arg: str | None) -> str | None:
    if arg:
        return arg if os.access(arg, os.X_OK) else None
    local = REPO / ".venv" / "bin" / "mistralrs"
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("mistralrs")


def probe(engine: str, args) -> tuple[bool, str]:
    """(available, version or reason)."""
    if engine.startswith("ours"):
        cli = find_cli(args.cli)
        if not cli:
            return False, "not installed (no mistralrs CLI; run `make venv` or pass --cli)"
        try:
            r = subprocess.run([cli, "--help"], capture_output=True, timeout=120)
        except OSError as e:
            return False, f"not runnable ({e})"
        if r.returncode != 0:
            return False, f"not runnable ({cli} --help exited {r.returncode})"
        try:
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
        except OSError:
            rev = ""
        return True, f"git {rev}" if rev else "local"
    py = args.peers_python
    if not (py and os.access(py, os.X_OK)):
        return False, f"not installed (no peers python at {py}; see scripts/peers_setup.sh)"
    r = subprocess.run([py, "-c", PEER_PROBES[engine]], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return False, "not installed (see scripts/peers_setup.sh)"
    return True, r.stdout.strip()


def bench_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
              "TORCH_NUM_THREADS"):
        env[k] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def one_run(engine: str, model_key: str, model_path: Path, prompt: tuple[str, int], args) -> dict:
    """prompt: (text, its token count as cut); llama.cpp's context is that plus the new tokens."""
    prompt, n_prompt = prompt
    threads = 1 if engine == "ours-1t" else args.threads
    env = bench_env(threads)
    n_ctx = max(1024, (n_prompt + args.max_tokens + 64 + 255) // 256 * 256)
    cfg = {"model": str(model_path), "prompt": prompt, "max_tokens": args.max_tokens,
           "threads": threads, "n_ctx": n_ctx, "flash_attn": engine == "llama.cpp-fa",
           # BOS per the model's tokenizer (add_bos metadata): only used by the mistral.rs template
           "add_bos": model_key == "gemma3"}
    if engine.startswith("ours"):
        cmd = [find_cli(args.cli), *OURS_NUMERICS.get(engine, []), "--raw", "--ignore-eos", "--max-tokens",
               str(args.max_tokens), "--temperature", "0", "--prompt", prompt, "gguf", "-f", str(model_path)]
    else:
        code = LLAMA_RUNNER if engine.startswith("llama.cpp") else MISTRALRS_RUNNER
        cmd = [args.peers_python, "-c", code, json.dumps(cfg)]
    p = run_process(cmd, env, args.timeout)
    res = {"engine": engine, "model": model_key, "rc": p["rc"], "wall_s": p["wall_s"],
           "peak_rss_mb": p["peak_rss_mb"]}
    if p["rc"] != 0 or p["timed_out"]:
        res["error"] = ("timed out; " if p["timed_out"] else f"exit {p['rc']}; ") + p["stderr"].strip()[-400:]
        return res
    if engine.startswith("ours"):
        m = STATS_RE.search(p["stderr"])
        if not m:
            res["error"] = "no stats line on stderr: " + p["stderr"].strip()[-400:]
            return res
        n_p, pps, n_g, dps, ttft_cli = int(m[1]), float(m[2]), int(m[3]), float(m[4]), float(m[5])
        res.update(prompt_tokens=n_p, gen_tokens=n_g, prefill_tps=pps, decode_tps=dps,
                   # the CLI's prompt_time runs from scheduling the request to the first token
                   ttft_in=n_p / pps if pps > 0 else None,
                   ttft_start=p["first_stdout_s"], ttft_cli_s=ttft_cli, text=p["stdout"].rstrip("\n"))
    else:
        line = next((ln for ln in p["stdout"].splitlines() if ln.startswith(RESULT_TAG)), None)
        if line is None:
            res["error"] = "no result line: " + (p["stdout"] + p["stderr"]).strip()[-400:]
            return res
        res.update(json.loads(line[len(RESULT_TAG):]))
    return res


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=1, unit=""):
    return "-" if v is None else f"{v:.{nd}f}{unit}"


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    keys = ("prefill_tps", "decode_tps", "ttft_in", "ttft_start", "peak_rss_mb", "prompt_tokens",
            "gen_tokens", "own_prefill_tps", "own_decode_tps")
    s = {k: median([r.get(k) for r in ok]) for k in keys}
    s["n_ok"], s["n"] = len(ok), len(runs)
    s["errors"] = [r["error"] for r in runs if "error" in r]
    return s


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list of {ENGINES}")
    ap.add_argument("--contexts", default=None,
                    help="comma list of 'short' and token counts (default short,512,2048,8192; "
                         "short with --busy-neighbour)")
    ap.add_argument("--busy-neighbour", action="store_true",
                    help="a separate process spins on one CPU during the runs; adds ours-1t")
    ap.add_argument("--models-dir", default=str(CACHE / "models"))
    ap.add_argument("--peers-python", default=os.environ.get("MISTRALRS_PEERS_PYTHON",
                                                             str(CACHE / "peers" / "bin" / "python")))
    ap.add_argument("--cli", default=None, help="our CLI (default: REPO/.venv/bin/mistralrs, else PATH)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--json", help="write raw runs and medians to this file")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.busy_neighbour and "ours-1t" not in args.engines:
        args.engines.append("ours-1t")
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")
    for e in args.engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {ENGINES}")
    raw = args.contexts or ("short" if args.busy_neighbour else "short,512,2048,8192")
    args.contexts = [c.strip() for c in raw.split(",") if c.strip()]
    for c in args.contexts:
        if c != "short" and not (c.isdigit() and int(c) > args.max_tokens + 16):
            ap.error(f"--contexts {c!r}: 'short' or a token count above --max-tokens + 16")
    return args


def prompts(args, paths: dict) -> dict:
    """(model, context) -> (prompt text, the token count it was cut to)."""
    out = {}
    for m, path in paths.items():
        targets = [int(c) - args.max_tokens - 16 for c in args.contexts if c != "short"]
        cuts = bench_context.prompt_cuts(str(path), targets, args.peers_python)
        text = bench_context.long_text()
        for c in args.contexts:
            if c == "short":
                out[(m, c)] = (PROMPT, 256)
            else:
                t = int(c) - args.max_tokens - 16
                out[(m, c)] = (text[:cuts[t]], t)
    return out


def run_all(args, live: list[str], paths: dict, texts: dict) -> list[dict]:
    runs: list[dict] = []
    for rep in range(args.repeats):
        paired = args.busy_neighbour and "ours" in live and "ours-1t" in live
        rest = [e for e in live if not (paired and e == "ours-1t")]
        k = rep % max(1, len(rest))
        order = rest[k:] + rest[:k]  # rotate so no engine always runs first
        if paired:  # ours-1t right beside ours (before it every other repeat): the same load for both
            i = order.index("ours") + rep % 2
            order.insert(i, "ours-1t")
        for m in paths:
            for c in args.contexts:
                for e in order:
                    print(f"# run {rep + 1}/{args.repeats} {e} {m} context {c} ...", file=sys.stderr, flush=True)
                    r = one_run(e, m, paths[m], texts[(m, c)], args)
                    r["repeat"], r["context"] = rep, c
                    runs.append(r)
                    if "error" in r:
                        print(f"#   failed: {r['error'][:300]}", file=sys.stderr)
                    else:
                        print(f"#   {fmt(r.get('prompt_tokens'), 0)} prompt tokens: prefill "
                              f"{fmt(r.get('prefill_tps'))} tok/s, decode {fmt(r.get('decode_tps'))} tok/s, ttft "
                              f"{fmt(r.get('ttft_in'), 2)} s / {fmt(r.get('ttft_start'), 2)} s, rss "
                              f"{fmt(r['peak_rss_mb'], 0)} MB", file=sys.stderr, flush=True)
    return runs


def print_tables(args, status: dict, summary: dict, paths: dict, load_before) -> None:
    busy = "; a busy neighbour (another process spinning on one CPU) during every run" if args.busy_neighbour else ""
    print(f"\n{args.max_tokens} new tokens (EOS ignored), greedy, {args.threads} threads (ours-1t: 1), raw prompt, "
          f"medians of {args.repeats}{busy}; TTFT in-process is from the request, from start is from spawn. "
          f"1-min load average before the runs {load_before[0]:.1f} on {os.cpu_count()} CPUs "
          f"(well above 0 means other work shared the CPUs).\n")
    print("| engine | model | context | prompt tok | prefill tok/s | decode tok/s | TTFT (in-process) | "
          "TTFT (from start) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for m in paths:
        for c in args.contexts:
            for e in args.engines:
                label = f"{e} ({status[e][1]})" if status[e][0] else e
                if (e, m) in KNOWN_BROKEN:
                    if c == args.contexts[0]:
                        notes.append(f"{e} on {MODELS[m]['label']}: {KNOWN_BROKEN[(e, m)]}")
                    label += f" [{len(notes)}]"
                head = f"| {label} | {MODELS[m]['label']} | {c} |"
                if not status[e][0]:
                    print(f"{head} not installed | | | | | |")
                    continue
                s = summary[(e, m, c)]
                if s["n_ok"] == 0:
                    err = s["errors"][0].replace("\n", " ")[:120] if s["errors"] else "no runs"
                    print(f"{head} failed: {err} | | | | | |")
                    continue
                print(f"{head} {fmt(s['prompt_tokens'], 0)} | {fmt(s['prefill_tps'])} | {fmt(s['decode_tps'])} | "
                      f"{fmt(s['ttft_in'], 2, ' s')} | {fmt(s['ttft_start'], 2, ' s')} | {fmt(s['peak_rss_mb'], 0)} |")
    for i, n in enumerate(notes, 1):
        print(f"\n[{i}] {n}")

    rows = []
    for m in paths:
        for c in args.contexts:
            for ours in (e for e in args.engines if e.startswith("ours")):
                o = summary.get((ours, m, c))
                for peer in ("llama.cpp", "llama.cpp-fa", "mistral.rs", "ours-1t"):
                    p = summary.get((peer, m, c))
                    if not o or not p or not o["n_ok"] or not p["n_ok"] or peer == ours:
                        continue

                    def ratio(k):
                        return o[k] / p[k] if o.get(k) and p.get(k) else None
                    rows.append(f"| {MODELS[m]['label']} | {c} | {ours}/{peer} | {fmt(ratio('prefill_tps'), 2)} | "
                                f"{fmt(ratio('decode_tps'), 2)} | {fmt(ratio('ttft_in'), 2)} | "
                                f"{fmt(ratio('ttft_start'), 2)} | {fmt(ratio('peak_rss_mb'), 2)} |")
    if rows:
        print("\nRatios (speed: >1 means ours is faster; TTFT and RSS: <1 means ours is lower):\n")
        print("| model | context | ratio | prefill | decode | TTFT (in-process) | TTFT (from start) | peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    status = {e: probe(e, args) for e in args.engines}
    for e, (ok, info) in status.items():
        print(f"# {e}: {info}" if ok else f"# {e}: {info} -- skipped", file=sys.stderr)
    live = [e for e in args.engines if status[e][0]]
    paths = {}
    for m in args.models:
        p = Path(args.models_dir) / MODELS[m]["file"]
        if p.exists():
            paths[m] = p
        else:
            print(f"# model {m}: {p} missing (scripts/fetch_models.py) -- skipped", file=sys.stderr)
    texts = prompts(args, paths)

    load_before = os.getloadavg()
    if args.busy_neighbour:
        limit = args.timeout * args.repeats * len(live) * len(paths) * len(args.contexts)
        with bench_context.Neighbour(limit) as nb:
            print(f"# busy neighbour: pid {nb.proc.pid} spinning on CPU {nb.cpu}", file=sys.stderr)
            runs = run_all(args, live, paths, texts)
    else:
        runs = run_all(args, live, paths, texts)
    summary = {(e, m, c): summarize([r for r in runs if (r["engine"], r["model"], r["context"]) == (e, m, c)])
               for m in paths for c in args.contexts for e in live}
    print_tables(args, status, summary, paths, load_before)

    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {"threads": args.threads, "max_tokens": args.max_tokens, "repeats": args.repeats,
                       "contexts": args.contexts, "busy_neighbour": args.busy_neighbour,
                       "prompts": {f"{m}/{c}": t[0] for (m, c), t in texts.items()},
                       "engines": {e: status[e][1] for e in args.engines},
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "runs": runs,
            "medians": [dict(engine=e, model=m, context=c, **s) for (e, m, c), s in summary.items()],
        }, indent=1))
        print(f"\n# raw results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
