#!/usr/bin/env python3
"""Speed of our `plain` path (a Hugging Face checkpoint loaded by loaders/plain.py) against
transformers on the same CPU: prefill of a ~200-token prompt and a greedy decode of 64 tokens.

Models: random llamas built with transformers and saved to a temp dir (config.json + safetensors):
  tiny      hidden 64, 2 layers, 4 heads, 2 kv heads, ffn 128, vocab 512
  smollm2   SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads, 3 kv heads, ffn 1536, vocab 49152
Both engines run in this one process with the same thread count, alternately run by run; the
table shows medians over --repeats runs and ours/transformers ratios (> 1: ours is faster).
Ours: load_plain_model, then the model's forward with its KV cache (prefill in one call, one call
per decoded token, argmax); transformers: the model's forward with its DynamicCache, the same loop.
This is a benchmark, not a test.

  python scripts/bench_plain.py [--threads 2] [--repeats 3] [--models tiny,smollm2] [--dtypes f32,bf16]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS, DECODE_TOKENS = 200, 64
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def build_checkpoint(name: str, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                      bos_token_id=0, eos_token_id=1, **{"tie_word_embeddings": False, **MODELS[name]})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a wider spread than the init so the continuation is not constant
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.05)
    path = out / name
    model.save_pretrained(path)
    return path


class Ours:
    label = "ours"

    def __init__(self, path: Path, dtype: str):
        from mistralrs_cli.loaders.plain import load_plain_model
        from mistralrs_cli.types import LoadOptions, PlainSpec

        self.model, self.cfg = load_plain_model(PlainSpec(str(path)), LoadOptions(dtype=dtype), path)
        self.model.eval()

    def run(self, ids: list[int], steps: int) -> tuple[float, float, list[int]]:
        from mistralrs_cli.engine.kv_cache import cache_for
        from mistralrs_cli.models.layers import Batch, SeqSlice

        cache, n, out = cache_for(self.model), len(ids), []
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.model(torch.tensor(ids), Batch(torch.arange(n), [SeqSlice(0, n, cache)]))
            out.append(int(logits[-1].argmax()))
            t1 = time.perf_counter()
            for i in range(steps - 1):
                logits = self.model(torch.tensor([out[-1]]), Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)]))
                out.append(int(logits[-1].argmax()))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


class Transformers:
    label = "transformers"

    def __init__(self, path: Path, dtype: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()

    def run(self, ids: list[int], steps: int) -> tuple[float, float, list[int]]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            res = self.model(torch.tensor([ids]), use_cache=True)
            out = [int(res.logits[0, -1].argmax())]
            t1 = time.perf_counter()
            for _ in range(steps - 1):
                res = self.model(torch.tensor([[out[-1]]]), past_key_values=res.past_key_values, use_cache=True)
                out.append(int(res.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--dtypes", default="f32,bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_plain_") as tmp:
        for name in args.models.split(","):
            path = build_checkpoint(name, Path(tmp))
            vocab = MODELS[name]["vocab_size"]
            ids = [0] + torch.randint(2, vocab, (PROMPT_TOKENS - 1,), generator=torch.Generator().manual_seed(1)).tolist()
            for dtype in args.dtypes.split(","):
                engines = [Ours(path, dtype), Transformers(path, dtype)]
                for e in engines:  # warm-up (allocator, kernels)
                    e.run(ids, 4)
                times = {e.label: ([], []) for e in engines}
                agree = None
                for _ in range(args.repeats):
                    toks = []
                    for e in engines:
                        pre, dec, out = e.run(ids, DECODE_TOKENS)
                        times[e.label][0].append(len(ids) / pre)
                        times[e.label][1].append((DECODE_TOKENS - 1) / dec)
                        toks.append(out)
                    same = next((i for i, (a, b) in enumerate(zip(*toks)) if a != b), len(toks[0]))
                    agree = same if agree is None else min(agree, same)
                med = {k: (statistics.median(p), statistics.median(d)) for k, (p, d) in times.items()}
                rows.append((name, dtype, med["ours"], med["transformers"], agree))
                print(f"done {name} {dtype}", flush=True)
    print(f"\n{args.threads} threads, prompt {PROMPT_TOKENS} tokens, {DECODE_TOKENS} greedy tokens, "
          f"medians of {args.repeats} (tokens/s)")
    print(f"{'model':8} {'dtype':5} | {'prefill ours':>12} {'hf':>8} {'ratio':>6} | "
          f"{'decode ours':>11} {'hf':>8} {'ratio':>6} | same greedy tokens")
    for name, dtype, ours, hf, agree in rows:
        print(f"{name:8} {dtype:5} | {ours[0]:12.1f} {hf[0]:8.1f} {ours[0] / hf[0]:6.2f} | "
              f"{ours[1]:11.1f} {hf[1]:8.1f} {ours[1] / hf[1]:6.2f} | {agree}/{DECODE_TOKENS}")


if __name__ == "__main__":
    main()
