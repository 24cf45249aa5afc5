#!/usr/bin/env python3
"""Decode speed of the native runtime with LoRA side paths unmerged, against the base model alone.

One process, one loaded GGUF model (default SmolLM2-135M Q4_1), a random adapter of real shapes
(rank --rank on all seven linear targets: q/k/v/o/gate/up/down of every layer; A and B drawn as
peft's init_lora_weights=False would, small uniform values). Variants, interleaved run by run
(the machine is shared and noisy: medians of --repeats runs each):
  base      no bank on the model
  idle      the bank set, but no row uses it (adapter_weights None): must cost nothing
  lora      every row uses the adapter (the engine's plain-LoRA weights, made per step as
            AdapterBank.weights_for makes them)
  lora3     three such adapters loaded, every row using one of them (--adapters 3; a batch where
            the others are idle pays nothing for them)
  all3      the three, every row using all of them (the side paths of an X-LoRA pass)
Each variant prefills the same --prompt-tokens prompt into its own cache, then the variants take
turns decoding --steps greedy tokens through model.step, --rounds times; a step's wall time is
timed alone (set_adapters between turns is not), and decode tok/s is 1 / the median step.

  python scripts/bench_lora.py [--model PATH] [--rank 16] [--rounds 24] [--steps 8] [--threads 2]
                               [--cpu-time]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

CLOCK = time.perf_counter
MODEL = Path.home() / ".cache" / "mistralrs-cli" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"self_attn.q_proj": ("d", "q"), "self_attn.k_proj": ("d", "kv"), "self_attn.v_proj": ("d", "kv"),
           "self_attn.o_proj": ("q", "d"), "mlp.gate_proj": ("d", "i"), "mlp.up_proj": ("d", "i"),
           "mlp.down_proj": ("i", "d")}


def random_adapter(name: str, cfg, rank: int, rng):
    from mistralrs_cli.adapters.bank import AdapterFactors

    sizes = {"d": cfg.hidden_size, "q": cfg.num_attention_heads * cfg.head_dim,
             "kv": cfg.num_key_value_heads * cfg.head_dim, "i": cfg.intermediate_size}
    factors = {}
    for layer in range(cfg.num_hidden_layers):
        for module, (fan_in, fan_out) in TARGETS.items():
            a = rng.uniform(-1, 1, (rank, sizes[fan_in])).astype(np.float32) / np.sqrt(sizes[fan_in])
            b = rng.uniform(-1, 1, (sizes[fan_out], rank)).astype(np.float32) / np.sqrt(rank) * 0.1
            factors[f"model.layers.{layer}.{module}"] = (a, b)
    return AdapterFactors(name, 2.0, factors)


class Run:
    """One variant's sequence: its own cache, decoding greedily a few steps at a time."""

    def __init__(self, model, bank, active: list[int] | None, prompt):
        from mistralrs_cli.engine.kv_cache import cache_for

        self.model, self.bank, self.active, self.cache, self.pos = model, bank, active, cache_for(model), 0
        self.times: list[float] = []
        self.model.set_adapters(bank)
        self.tok = self.step(prompt)

    def step(self, ids: list[int]) -> int:
        from mistralrs_cli.models.batch import SeqSlice

        w = None if self.active is None else self.bank.weights_for([(len(ids), self.active)])  # as the engine
        out = self.model.step(ids, list(range(self.pos, self.pos + len(ids))), [SeqSlice(0, len(ids), self.cache)],
                              [len(ids) - 1], adapter_weights=w)
        self.pos += len(ids)
        return int(out[-1].argmax())

    def decode(self, n: int) -> None:
        self.model.set_adapters(self.bank)  # (not timed)
        for _ in range(n):
            t0 = CLOCK()
            self.tok = self.step([self.tok])
            self.times.append(CLOCK() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per variant per round")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time steps by the process's CPU time (with --threads 1: steadier on a busy machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from mistralrs_cli.adapters.bank import AdapterBank
    from mistralrs_cli.backends import native
    from mistralrs_cli.backends.native_model import NativeModel
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    native.set_threads(args.threads)
    model = load(GGUFSpec(args.model), LoadOptions(token_source="none")).model
    assert isinstance(model, NativeModel), "the native runtime did not take this file"
    cfg, rng = model.config, np.random.default_rng(0)
    adapters = [random_adapter(f"a{i}", cfg, args.rank, rng) for i in range(max(1, args.adapters))]
    one = AdapterBank(adapters[:1], cfg.num_hidden_layers)
    many = AdapterBank(adapters, cfg.num_hidden_layers)
    prompt = [int(x) for x in rng.integers(100, cfg.vocab_size - 100, args.prompt_tokens)]
    variants = {"base": (None, None), "idle": (one, None), "lora": (one, [0])}
    if args.adapters > 1:
        variants["lora3"] = (many, [args.adapters - 1])
        variants["all3"] = (many, list(range(args.adapters)))
    runs = {name: Run(model, bank, active, prompt) for name, (bank, active) in variants.items()}
    for rnd in range(args.rounds):  # variants interleaved a few steps at a time: the noise hits all alike
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            runs[name].decode(args.steps)
    model.set_adapters(None)
    base = statistics.median(runs["base"].times)
    print(f"{Path(args.model).name}, rank {args.rank} on q/k/v/o/gate/up/down of {cfg.num_hidden_layers} layers, "
          f"{args.threads} threads, {'CPU' if args.cpu_time else 'wall'} time; {args.rounds} rounds of {args.steps} decode steps per variant, interleaved")
    for name, r in runs.items():
        med = statistics.median(r.times)
        q1, q3 = np.percentile(r.times, [25, 75])
        print(f"  {name:6s} decode {1 / med:7.1f} tok/s (median step {1e3 * med:.2f} ms, quartiles "
              f"{1e3 * q1:.2f}..{1e3 * q3:.2f})  {base / med:.3f}x base")


if __name__ == "__main__":
    main()
