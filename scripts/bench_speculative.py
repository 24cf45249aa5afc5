"""Speculative decoding on real pairs with no hub: the target is the model at full or half
precision (a GGUF written here from the quantized file's dequantized tensors with gguf's
GGUFWriter, metadata and tokenizer kept: SmolLM2-135M as F32, Gemma-3-270M as F16), served by the
native runtime (csrc/floatmm.c); the draft is the quantized file itself, loaded as the
`speculative` subcommand loads it (loaders/speculative.py). Reports acceptance
and decode tok/s against the target alone, greedy and at temperature 0.7, batch 1 and 8, and
n-gram speculation on a summarise-this-text prompt; variants interleaved round by round in one
process (the machine is shared), medians with the spread (min-max) over rounds. Each rate is
also given per second of the process's CPU time (all threads), steadier than the wall clock when
other processes take the cores; with --threads 1 it counts no barrier spinning either.

    .venv/bin/python scripts/bench_speculative.py --pair smollm2 [--tokens 48] [--rounds 3] [--threads 1]
    .venv/bin/python scripts/bench_speculative.py --pair gemma3

Measured (SmolLM2, 2 cores shared with other sessions at load average 4-11, after the kernels'
weight prefetch): --threads 1 --tokens 96 --rounds 5, greedy batch 1 2.31x per CPU second
(2.42x wall), T=0.7 2.19x (2.72x), drafts accepted 98-100%, 5.88 tokens per verify; n-gram on
the summary prompt 3.02x (2.78x). Default threads, 48 tokens, 3 rounds, load 2-4 (git
3b62fe6): greedy batch 1 2.17x, T=0.7 2.15x; batch 8 the policy drafts nothing, 1.01x / 0.99x,
gamma 5 fixed 0.92x / 0.97x. Where a speculative step's CPU time goes (one thread,
cProfile with process_time): 94% in the native kernels (target decode 39 ms, 6-row verify 50
ms, draft step 8.7 ms), 6% in Python, embedding, sampling and cache bookkeeping. More figures:
README, "Speculative decoding".
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.spec_costs import Costs
from mistralrs_cli.engine.speculative import SpecConfig
from mistralrs_cli.loaders.load import load
from mistralrs_cli.loaders.speculative import load_speculative
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, GGUFSpec, LoadOptions, SamplingParams, SpeculativeSpec

MODELS = Path.home() / ".cache" / "mistralrs-cli" / "models"
PAIRS = {"smollm2": (MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", Q.F32),
         "gemma3": (MODELS / "gemma-3-270m-q4_k_m.gguf", Q.F16)}
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "List five facts about the moon.", "What is the capital of France and why?",
           "Describe a rainy day in a city.", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "Tell me about the history of chess."]
ARTICLE = ("The town council met on Tuesday to discuss the new library. The new library will open in "
           "the spring, and the new library will have a reading room, a children's corner and a cafe. "
           "Council members said the new library is the town's largest project in ten years. ") * 3


def write_float(src: Path, dst: Path, qtype: Q) -> Path:
    """src's metadata and tensors, every 2-D tensor dequantized and stored as qtype (1-D: F32)."""
    if dst.exists():
        return dst
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    w.add_file_type(0 if qtype == Q.F32 else 1)  # ALL_F32 / MOSTLY_F16
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (Q.F32, Q.F16):
            data = dequantize(data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape)]
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        w.add_tensor(t.name, data.astype(np.float16) if qtype == Q.F16 and len(shape) == 2 else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def decode_rate(loaded, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig | None):
    """Generated tokens per second after each request's first token (all requests at once): per
    wall-clock second and per second of the process's CPU time (every thread's)."""
    loaded.speculative = spec
    engine = Engine(loaded, EngineConfig(prefix_cache_n=0))
    if engine.spec is not None:  # measured once, before any timing (the engine would at its first step)
        engine.spec.costs = COSTS[id(spec.draft)]
    reqs = [engine.add_request(p, dataclasses.replace(params, seed=i)) for i, p in enumerate(prompts)]
    while any(not r.output_ids for r in reqs):  # prefills (and first tokens) out of the timing
        engine.step()
    t0, c0, n0 = time.perf_counter(), time.process_time(), sum(len(r.output_ids) for r in reqs)
    while engine.has_unfinished():
        engine.step()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(r.output_ids) for r in reqs) - n0
    acc = (engine.spec.acceptance_rate, engine.spec.mean_accepted_length, engine.spec.runs) if engine.spec else None
    return (n / dt, n / dc), acc


COSTS: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", choices=sorted(PAIRS), default="smollm2")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="all", help="comma-separated case names, or all")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: every core)")
    args = ap.parse_args()
    if args.threads:
        from mistralrs_cli.backends import native

        native.set_threads(args.threads)
    src, qtype = PAIRS[args.pair]
    target_path = write_float(src, Path("/tmp") / f"{src.stem}.{qtype.name}.gguf", qtype)
    opts = LoadOptions(token_source="none")
    pair = load_speculative(SpeculativeSpec(GGUFSpec(str(target_path)), GGUFSpec(str(src)), 5), opts, load)
    target, draft = pair, pair.speculative.draft
    print(f"target {target_path.name}: {type(target.model).__name__}; draft {src.name}: "
          f"{type(draft.model).__name__} ({draft.model.numerics})")
    tc = Costs.measure(target.model)
    COSTS.update({id(draft): (tc, Costs.measure(draft.model)), id(None): (tc, None)})
    print(f"forward ms at {'/'.join(str(r) for r, _ in tc.points)} rows: target",
          [f"{1e3 * t:.1f}" for _, t in tc.points], "draft", [f"{1e3 * t:.1f}" for _, t in COSTS[id(draft)][1].points])
    ids = [chat_ids(target, [{"role": "user", "content": p}]) for p in PROMPTS]
    summ = chat_ids(target, [{"role": "user", "content": "Summarise this text:\n\n" + ARTICLE}])
    cases = []
    for temp in (0.0, 0.7):
        params = SamplingParams(temperature=temp, max_tokens=args.tokens, ignore_eos=True)
        for batch in (1, 8):
            cases.append((f"T={temp} batch {batch}", ids[:batch], params))
    cases.append(("summarise greedy batch 1", [summ], SamplingParams(temperature=0.0, max_tokens=args.tokens,
                                                                      ignore_eos=True)))
    if args.cases != "all":
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    modes = {"target alone": None, "draft (policy)": SpecConfig(gamma=5, draft=draft),
             "draft gamma 5 fixed": SpecConfig(gamma=5, draft=draft, fixed=True), "ngram 3 (policy)": SpecConfig(ngram=3)}
    for name, prompts, params in cases:
        results: dict[str, list] = {m: [] for m in modes}
        for _ in range(args.rounds):  # interleaved: the shared machine's load hits every mode alike
            for mode, spec in modes.items():
                results[mode].append(decode_rate(target, prompts, params, spec))
        base = np.median([r[0] for r, _ in results["target alone"]])
        cbase = np.median([r[1] for r, _ in results["target alone"]])
        for mode, rs in results.items():
            rates = [r[0] for r, _ in rs]
            rate, crate = float(np.median(rates)), float(np.median([r[1] for r, _ in rs]))
            acc = rs[-1][1]
            extra = f", accepted {acc[0]:.0%}, {acc[1]:.2f} tok/verify, {acc[2]} verifies" if acc else ""
            print(f"{name:26s} {mode:20s} {rate:6.1f} tok/s [{min(rates):.1f}-{max(rates):.1f}] "
                  f"({rate / base:.2f}x); per CPU s {crate:6.1f} ({crate / cbase:.2f}x){extra}", flush=True)


if __name__ == "__main__":
    main()
