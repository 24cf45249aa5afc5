#!/usr/bin/env python3
"""Write a random PEFT LoRA adapter folder with the real shapes of a GGUF model's projections
(for speed runs: no training, no transformers model), plus an ordering for it:

  python scripts/random_adapter.py model.gguf OUT_DIR [--rank 16] [--names a1,a2] [--rel 0.01]

OUT_DIR/<name>/{adapter_config.json, adapter_model.safetensors} on all seven projections of every
layer, and OUT_DIR/ordering.json (create_ordering.py's layers; every name in `order`). B is scaled
so the delta is about --rel of a unit-variance weight's norm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SEVEN = {"self_attn.q_proj": ("d", "q"), "self_attn.k_proj": ("d", "kv"), "self_attn.v_proj": ("d", "kv"),
         "self_attn.o_proj": ("q", "d"), "mlp.gate_proj": ("d", "ff"), "mlp.up_proj": ("d", "ff"),
         "mlp.down_proj": ("ff", "d")}


def main() -> None:
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--names", default="a1")
    p.add_argument("--rel", type=float, default=0.01)
    a = p.parse_args()
    r = GGUFReader(a.gguf)

    def value(key: str) -> int:
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = bytes(r.fields["general.architecture"].parts[r.fields["general.architecture"].data[0]]).decode()
    d, heads = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    kv = value(f"{arch}.attention.head_count_kv")
    hd = value(f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in r.fields else d // heads
    sizes = {"d": d, "q": heads * hd, "kv": kv * hd, "ff": value(f"{arch}.feed_forward_length")}
    n_layers = value(f"{arch}.block_count")
    out = Path(a.out)
    rng = np.random.default_rng(0)
    names = [n for n in a.names.split(",") if n]
    for name in names:
        tensors = {}
        for i in range(n_layers):
            for module, (i_in, i_out) in SEVEN.items():
                n_in, n_out = sizes[i_in], sizes[i_out]
                A = rng.standard_normal((a.rank, n_in), dtype=np.float32) / np.sqrt(n_in)
                B = rng.standard_normal((n_out, a.rank), dtype=np.float32) * (a.rel / np.sqrt(a.rank))
                key = f"base_model.model.model.layers.{i}.{module}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        (out / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / name / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": a.rank, "lora_alpha": a.rank,
               "target_modules": [m.split(".")[1] for m in SEVEN]}
        (out / name / "adapter_config.json").write_text(json.dumps(cfg))
    script = Path(__file__).with_name("create_ordering.py")
    subprocess.run([sys.executable, str(script), "--model", a.gguf, "--adapters", str(out), "--order", ",".join(names),
                    "-o", str(out / "ordering.json")], check=True)


if __name__ == "__main__":
    main()
