"""Speculative decoding on a real pair with no hub: the target is SmolLM2-135M at full precision
(an F32 GGUF written here from the Q4_1 file's dequantized tensors: the function the exact path
computes), the draft is the Q4_1 file itself. Reports acceptance and decode tok/s against the
target alone, greedy and at temperature 0.7, batch 1 and 8, and n-gram speculation on a
summarise-this-text prompt; configurations interleaved in one process (the machine is shared).

    .venv/bin/python scripts/bench_speculative.py [--tokens 64] [--rounds 2]

Measured here (git d246583+, --tokens 32 --rounds 2, 2 shared cores at load average 2-5; the F32
target runs on the torch path at ~10 tok/s, where a 6-token verify chunk costs ~3x a decode step):
                              target alone   draft, gamma 5 (adaptive)   n-gram 3
    greedy, batch 1             8.0 tok/s    11.8 (1.48x), 100% accepted    7.8 (0.97x), no match
    greedy, batch 8             9.7          36.2 (3.71x), 100%            11.7 (1.21x), 14%
    T=0.7, batch 1              6.8           9.2 (1.35x), 100%             6.8 (1.00x), no match
    T=0.7, batch 8             11.0          29.1 (2.64x), 99%             12.1 (1.10x), 31%
    summarise, greedy, batch 1 10.2          11.0 (1.08x), 100%            15.2 (1.50x), 91%
The draft is the target's own weights quantized (the F32 file is the Q4_1 file dequantized), so it
agrees almost always; what bounds the speed-up at batch 1 is the draft's cost (5 native decode
steps) beside the torch target's verify chunk.
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
from mistralrs_cli.engine.speculative import SpecConfig
from mistralrs_cli.loaders.load import load
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, GGUFSpec, LoadOptions, SamplingParams

MODELS = Path.home() / ".cache" / "mistralrs-cli" / "models"
DRAFT = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "List five facts about the moon.", "What is the capital of France and why?",
           "Describe a rainy day in a city.", "Give me a recipe for pancakes.",
           "Why is the sky blue?", "Tell me about the history of chess."]
ARTICLE = ("The town council met on Tuesday to discuss the new library. The new library will open in "
           "the spring, and the new library will have a reading room, a children's corner and a cafe. "
           "Council members said the new library is the town's largest project in ten years. ") * 3


def write_f32(src: Path, dst: Path) -> Path:
    """src's metadata and tensors, every tensor dequantized to F32."""
    if dst.exists():
        return dst
    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    w.add_file_type(0)  # ALL_F32
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (Q.F32,):
            data = dequantize(data, t.tensor_type)
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def decode_rate(loaded, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig | None):
    """Generated tokens per second after each request's first token (all requests at once)."""
    loaded.speculative = spec
    engine = Engine(loaded, EngineConfig(prefix_cache_n=0))
    reqs = [engine.add_request(p, dataclasses.replace(params, seed=i)) for i, p in enumerate(prompts)]
    while any(not r.output_ids for r in reqs):  # prefills (and first tokens) out of the timing
        engine.step()
    t0, n0 = time.perf_counter(), sum(len(r.output_ids) for r in reqs)
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    rate = (sum(len(r.output_ids) for r in reqs) - n0) / dt
    acc = (engine.spec.acceptance_rate, engine.spec.mean_accepted_length) if engine.spec else None
    return rate, acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--target", default="/tmp/SmolLM2-135M-Instruct.F32.gguf")
    args = ap.parse_args()
    target_path = write_f32(DRAFT, Path(args.target))
    opts = LoadOptions(token_source="none")
    target, draft = load(GGUFSpec(str(target_path)), opts), load(GGUFSpec(str(DRAFT)), opts)
    print(f"target {target_path.name}: {type(target.model).__name__}; draft {DRAFT.name}: {type(draft.model).__name__}")
    ids = [chat_ids(target, [{"role": "user", "content": p}]) for p in PROMPTS]
    summ = chat_ids(target, [{"role": "user", "content": "Summarise this text:\n\n" + ARTICLE}])
    cases = []
    for temp in (0.0, 0.7):
        params = SamplingParams(temperature=temp, max_tokens=args.tokens, ignore_eos=True)
        for batch in (1, 8):
            cases.append((f"T={temp} batch {batch}", ids[:batch], params))
    cases.append(("summarise, greedy, batch 1", [summ], SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)))
    modes = {"target alone": None, "draft gamma 5": SpecConfig(gamma=5, draft=draft),
             "draft gamma 5 fixed": SpecConfig(gamma=5, draft=draft, fixed=True), "ngram 3": SpecConfig(ngram=3)}
    for name, prompts, params in cases:
        results: dict[str, list] = {m: [] for m in modes}
        for _ in range(args.rounds):  # interleaved: the shared machine's load hits every mode alike
            for mode, spec in modes.items():
                results[mode].append(decode_rate(target, prompts, params, spec))
        base = np.median([r for r, _ in results["target alone"]])
        for mode, rs in results.items():
            rate = float(np.median([r for r, _ in rs]))
            acc = rs[-1][1]
            extra = f", accepted {acc[0]:.0%}, {acc[1]:.2f} tok/verify" if acc else ""
            print(f"{name:28s} {mode:22s} {rate:7.1f} tok/s ({rate / base:.2f}x){extra}", flush=True)


if __name__ == "__main__":
    main()
