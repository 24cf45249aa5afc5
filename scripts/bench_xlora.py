#!/usr/bin/env python3
"""Decode speed of X-LoRA in the native runtime against the base model alone.

One process, one loaded GGUF model (default SmolLM2-135M Q4_1), three random adapters of real
shapes (scripts/bench_lora.py's, rank --rank on all seven linear targets) and a random classifier
(depth 1). Variants, interleaved a few steps at a time (the machine is shared and noisy: medians):
  base    the model alone (no adapter weights)
  xlora   engine/xlora_step.py's two passes per token: the scaling pass (scaling_pass_value 0:
          the base model, on the sequence's second KV cache), the classifier, the real pass with
          the three adapters weighed by the scalings
  xlora0  --tgt-non-granular-index 0: the prompt's scalings reused, one pass per token
A step is timed from the scaling pass to the logits; decode tok/s is 1 / the median step.

  python scripts/bench_xlora.py [--model PATH] [--rank 16] [--rounds 16] [--steps 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import MODEL, random_adapter  # noqa: E402


class Run:
    """One variant's sequence, decoding greedily through XLoraStep.fill + model.step as the engine does."""

    def __init__(self, model, step, prompt: list[int]):
        from mistralrs_cli.engine.kv_cache import cache_for
        from mistralrs_cli.engine.request import Request
        from mistralrs_cli.types import SamplingParams

        self.model, self.xs, self.times = model, step, []
        self.req = Request(f"r{id(self)}", list(prompt), SamplingParams(adapters=None if step else []))
        self.req.cache = cache_for(model)
        self.req.output_ids.append(self.forward(len(prompt)))

    def forward(self, n: int) -> int:
        from mistralrs_cli.engine.scheduler import Scheduled
        from mistralrs_cli.models.batch import SeqSlice

        req, start = self.req, self.req.n_computed
        w = self.xs.fill(None, [Scheduled(req, n)], n) if self.xs else None
        out = self.model.step(req.tokens(start, start + n), list(range(start, start + n)), [SeqSlice(0, n, req.cache)],
                              [n - 1], adapter_weights=w)
        req.n_computed += n
        return int(out[-1].argmax())

    def decode(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            tok = self.forward(1)
            self.times.append(time.perf_counter() - t0)
            self.req.output_ids.append(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from mistralrs_cli.adapters.bank import AdapterBank
    from mistralrs_cli.adapters.xlora import XLoraClassifier, XLoraConfig, module_slots
    from mistralrs_cli.backends import native
    from mistralrs_cli.backends.native_model import NativeModel
    from mistralrs_cli.engine.xlora_step import XLoraStep
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    native.set_threads(args.threads)
    model = load(GGUFSpec(args.model), LoadOptions(token_source="none")).model
    assert isinstance(model, NativeModel), "the native runtime did not take this file"
    cfg, rng = model.config, np.random.default_rng(0)
    adapters = [random_adapter(f"a{i}", cfg, args.rank, rng) for i in range(3)]
    modules = sorted({m for a in adapters for m in a.factors})
    bank = AdapterBank(adapters, cfg.num_hidden_layers, module_slots(modules))
    model.set_adapters(bank)
    xcfg = XLoraConfig(hidden_size=cfg.hidden_size, adapters=bank.names)
    tensors = {"layers.0.weight": rng.normal(0, 0.05, (3, cfg.hidden_size)).astype(np.float32),
               "layers.0.bias": np.zeros(3, np.float32)}
    clf = XLoraClassifier(xcfg, tensors, bank.n_slots)
    prompt = [int(x) for x in rng.integers(100, cfg.vocab_size - 100, args.prompt_tokens)]
    runs = {"base": Run(model, None, prompt), "xlora": Run(model, XLoraStep(model, clf, bank), prompt),
            "xlora0": Run(model, XLoraStep(model, clf, bank, tgt_non_granular_index=0), prompt)}
    for rnd in range(args.rounds):
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            runs[name].decode(args.steps)
    base = statistics.median(runs["base"].times)
    print(f"{Path(args.model).name}, 3 adapters of rank {args.rank} on q/k/v/o/gate/up/down of "
          f"{cfg.num_hidden_layers} layers, {args.threads} threads, wall time; {args.rounds} rounds of "
          f"{args.steps} decode steps per variant, interleaved")
    for name, r in runs.items():
        med = statistics.median(r.times)
        q1, q3 = np.percentile(r.times, [25, 75])
        print(f"  {name:6s} decode {1 / med:7.1f} tok/s (median step {1e3 * med:.2f} ms, quartiles "
              f"{1e3 * q1:.2f}..{1e3 * q3:.2f})  {base / med:.3f}x base")


if __name__ == "__main__":
    main()
