"""Which sampling defaults make chat instructions end by themselves? Runs a set of instructions
(chat template applied) on the real models under several sampling settings, all requests of one
setting batched through one engine, and reports how many ended by an end token within
--max-tokens, and the mean answer length.

    python scripts/defaults_sweep.py                         # the tuning instructions below
    python scripts/defaults_sweep.py --held-out              # tests/test_defaults_end.py's ones
    python scripts/defaults_sweep.py --configs default,greedy --models gemma3 --seeds 1,2

The defaults in mistralrs_cli/sampling_defaults.py were chosen on TUNE; the test checks
instructions that were not used to choose them.
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mistralrs_cli import Runner, Which  # noqa: E402
from mistralrs_cli.loaders.load import cache_root  # noqa: E402
from mistralrs_cli.prompting import chat_ids  # noqa: E402
from mistralrs_cli.sampling_defaults import CHAT_DEFAULTS, sampling_params  # noqa: E402
from mistralrs_cli.types import EngineConfig  # noqa: E402

MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}

TUNE = [
    "Write a haiku about rust.",
    "Explain in two sentences why the sky is blue.",
    "List three tips for sleeping better.",
    "Translate 'good morning, my friend' into French.",
    "Write a Python function that reverses a string.",
    "What is 17 times 3?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Write a short email asking my manager for a day off.",
    "Tell me a short story about a robot who learns to paint.",
    "Give me some advice for my first job interview.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Suggest a name for a coffee shop by the sea.",
    "How do I boil an egg?",
    "Write a limerick about a forgetful wizard.",
    "What are the primary colors?",
    "Explain what a black hole is to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why do leaves change color in autumn?",
    "Write a motivational quote for a Monday morning.",
]

# name -> explicit settings over CHAT_DEFAULTS
CONFIGS = {
    "default": {},
    "llama.cpp": {"repetition_penalty": 1.0},  # llama.cpp's own defaults (no penalty)
    "ollama": {"top_p": 0.9, "min_p": 0.0},  # Ollama's: top-p 0.9, no min-p, penalty 1.1 / 64
    "greedy": {"temperature": 0.0},  # mistral.rs's unset temperature
    "greedy+rep": {"temperature": 0.0, "repetition_penalty": 1.1},
    "t0.6": {"temperature": 0.6},
    "t1.0": {"temperature": 1.0},
    "rep1.2": {"repetition_penalty": 1.2},
    "gemma-own": {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0},  # Gemma's generation_config
}


def spare_end_tokens(runner: Runner) -> None:
    """An experiment: the penalties leave the model's end tokens alone (the prompt's own end-of-turn
    token otherwise counts as a repetition for the first 64 tokens)."""
    from mistralrs_cli.engine import sampler

    eos, penalize = set(runner.loaded.eos_ids), sampler.apply_penalties
    sampler.apply_penalties = lambda logits, history, p: penalize(logits, [t for t in history if t not in eos], p)


def held_out() -> list[str]:
    """INSTRUCTIONS of tests/test_defaults_end.py, read without importing the test."""
    tree = ast.parse((ROOT / "tests" / "test_defaults_end.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "INSTRUCTIONS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("tests/test_defaults_end.py has no INSTRUCTIONS list")


def run_config(runner: Runner, prompts: list[list[int]], overrides: dict, seeds: list[int],
               max_tokens: int) -> list[tuple[str, int]]:
    """(finish reason, completion tokens) of every prompt x seed, all in one batch."""
    reqs = {}
    for seed in seeds:
        for ids in prompts:
            params = sampling_params({**overrides, "seed": seed, "max_tokens": max_tokens},
                                     runner.loaded.generation_config)
            reqs[runner.engine.add_request(ids, params).id] = None
    while any(v is None for v in reqs.values()):
        for out in runner.engine.step():
            if out.finish_reason is not None and out.request_id in reqs:
                reqs[out.request_id] = (out.finish_reason, out.completion_tokens)
    return list(reqs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--held-out", action="store_true", help="the test's instructions instead of TUNE")
    ap.add_argument("--first", type=int, default=None, help="only the first N instructions")
    ap.add_argument("--spare-end-tokens", action="store_true", help="no penalty on end tokens (experiment)")
    args = ap.parse_args()
    instructions = (held_out() if args.held_out else TUNE)[:args.first]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"defaults: {CHAT_DEFAULTS}; {len(instructions)} instructions x {len(seeds)} seeds, "
          f"max {args.max_tokens} tokens")
    print("| model | setting | ended by EOS | mean tokens | median | longest | seconds |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        path = cache_root() / "models" / MODELS[model]
        runner = Runner(Which.GGUF(None, str(path)), token_source="none",
                        engine_config=EngineConfig(max_seqs=64))
        if args.spare_end_tokens:
            spare_end_tokens(runner)
        prompts = [chat_ids(runner.loaded, [{"role": "user", "content": q}]) for q in instructions]
        for name in args.configs.split(","):
            t0 = time.perf_counter()
            res = run_config(runner, prompts, CONFIGS[name], seeds, args.max_tokens)
            n = [t for _, t in res]
            ended = sum(r == "stop" for r, _ in res)
            cut = sorted({i % len(prompts) for i, (r, _) in enumerate(res) if r != "stop"})
            print(f"| {model} | {name} | {ended}/{len(res)} | {statistics.mean(n):.0f} | "
                  f"{statistics.median(n):.0f} | {max(n)} | {time.perf_counter() - t0:.0f} |"
                  + (f" not ended: {cut}" if cut else ""), flush=True)


if __name__ == "__main__":
    main()
