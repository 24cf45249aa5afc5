#!/usr/bin/env python3
"""llama.cpp's runtime LoRA on the same model and adapter shapes as bench_lora.py, for comparison.

llama.cpp's own converter (convert_lora_to_gguf.py) needs a llama.cpp checkout and the base
model's HF folder, neither of which is here offline; this script writes the adapter GGUF itself
with gguf-py (llama.cpp's Python package) in the layout llama-adapter.cpp reads: general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and `blk.N.<tensor>.weight.lora_a` (r x in) /
`.lora_b` (out x r) in F16 (the converter's default out type) for the seven projections of every
layer. Random values, rank --rank, alpha = rank. Then, in the peers venv (llama-cpp-python), one
process loads the model twice, without and with `lora_path`, and decodes greedily in turns of
--steps tokens per variant, --rounds times; decode tok/s is 1 / the median step.

  python scripts/bench_lora_llamacpp.py [--model PATH] [--rank 16] [--rounds 16] [--steps 8] [--threads 2]
                                        [--peers-python ~/.cache/mistralrs-cli/peers/bin/python]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "mistralrs-cli"
SEVEN = {"attn_q": ("d", "q"), "attn_k": ("d", "kv"), "attn_v": ("d", "kv"), "attn_output": ("q", "d"),
         "ffn_gate": ("d", "ff"), "ffn_up": ("d", "ff"), "ffn_down": ("ff", "d")}

RUNNER = r'''
import json, statistics, sys, time
import numpy as np
from llama_cpp import Llama
cfg = json.loads(sys.argv[1])
kw = dict(n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_ctx=1024, verbose=False)
runs = {"base": Llama(model_path=cfg["model"], **kw), "lora": Llama(model_path=cfg["model"], lora_path=cfg["lora"], **kw)}
times = {k: [] for k in runs}
last, first = {}, {}
for name, llm in runs.items():
    llm.eval(list(range(100, 132)))
    first[name] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    last[name] = int(np.argmax(first[name]))
for rnd in range(cfg["rounds"]):
    for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
        llm = runs[name]
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            llm.eval([last[name]])
            last[name] = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            times[name].append(time.perf_counter() - t0)
moved = float(np.abs(first["lora"] - first["base"]).max())  # the adapter was applied
print("RESULT " + json.dumps({"moved": moved, **{k: statistics.median(v) for k, v in times.items()}}))
'''


def write_adapter(model: Path, out: Path, rank: int) -> None:
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter

    r = GGUFReader(str(model))

    def field(key: str):
        f = r.fields[key]
        return f.parts[f.data[0]]

    arch = bytes(field("general.architecture")).decode()
    n = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # gguf shapes: (in, out)
    layers = int(field(f"{arch}.block_count")[0])
    w = GGUFWriter(str(out), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(0)
    for i in range(layers):
        for t in SEVEN:
            n_in, n_out = n[f"blk.{i}.{t}.weight"]
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float16)
            b = (rng.standard_normal((n_out, rank)) * 0.01 / np.sqrt(rank)).astype(np.float16)
            w.add_tensor(f"blk.{i}.{t}.weight.lora_a", a, raw_dtype=Q.F16)
            w.add_tensor(f"blk.{i}.{t}.weight.lora_b", b, raw_dtype=Q.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers-python", default=str(CACHE / "peers" / "bin" / "python"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lora = Path(d) / "lora.gguf"
        write_adapter(Path(args.model), lora, args.rank)
        cfg = {"model": args.model, "lora": str(lora), "threads": args.threads, "rounds": args.rounds,
               "steps": args.steps}
        proc = subprocess.run([args.peers_python, "-c", RUNNER, json.dumps(cfg)], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"llama.cpp run failed: {proc.stderr.strip()[-600:]}")
    med = json.loads(lines[0][7:])
    moved = med.pop("moved")
    print(f"llama.cpp runtime LoRA, {Path(args.model).name}, rank {args.rank} (F16) on the seven projections, "
          f"{args.threads} threads; {args.rounds} rounds of {args.steps} steps per variant, interleaved; the "
          f"adapter moves the prompt's last logits by up to {moved:.3f}")
    for name, s in med.items():
        print(f"  {name:5s} decode {1 / s:7.1f} tok/s (median step {1e3 * s:.2f} ms)  {med['base'] / s:.3f}x base")


if __name__ == "__main__":
    main()
