#!/usr/bin/env python3
"""Write a LoRA / X-LoRA ordering file (orderings/README.md) from a base model and adapters,
without prompts (mistral.rs's script asks questions and needs the whole model in memory; this one
reads only the base's config.json or GGUF header and the adapters' adapter_config.json).

  python scripts/create_ordering.py --model org/model-or-dir-or-config.json-or-file.gguf \\
      --adapters ADAPTERS_DIR [--order a,b] [--preload name=model_id ...] -o ordering.json
  python scripts/create_ordering.py --model config.json --target-modules q_proj,v_proj \\
      --order adapter_1,adapter_2 --base-model-id org/model -o ordering.json

`layers` lists every adapted module of every decoder layer in the model's module order, numbered
from 0; `order` defaults to every adapter folder in --adapters (sorted by name).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# model_type -> its adaptable linear modules inside a decoder layer, in the model's module order
LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = {
    **{t: LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                          "gemma3_text")},
    "phi3": ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),  # transformers' order
    "phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
    "starcoder2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.c_fc", "mlp.c_proj"),
}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def base_shape(model: str) -> tuple[str, int]:
    """(model_type, decoder layers) from a config.json, a directory holding one, or a GGUF file."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            fail(f"{path} has no general.architecture; is it a GGUF model?")
        arch = bytes(field.parts[field.data[0]]).decode()
        count = reader.fields.get(f"{arch}.block_count")
        if count is None:
            fail(f"{path} has no {arch}.block_count.")
        return arch, int(count.parts[count.data[0]][0])
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    if not path.is_file():
        fail(f"{path} does not exist; pass a config.json, a model directory, a repo id or a .gguf file to --model.")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    return cfg.get("model_type", ""), int(cfg["num_hidden_layers"])


def adapter_targets(folder: Path) -> list[str] | str:
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return cfg["target_modules"]


def adapted(module: str, targets: list[str] | str) -> bool:
    """peft's matching: a regex string must match the whole name; a list entry the name or its
    last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def layers(model_type: str, n_layers: int, targets: list[str] | str) -> dict[str, int]:
    if model_type not in MODULES:
        fail(f"model_type {model_type!r} is not one this script knows ({', '.join(sorted(MODULES))}).")
    names = [f"model.layers.{i}.{m}" for i in range(n_layers) for m in MODULES[model_type]]
    chosen = [n for n in names if adapted(n, targets)]
    if not chosen:
        fail(f"no {model_type} module matches the target modules {targets}.")
    return {n: i for i, n in enumerate(chosen)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="config.json, a model directory or repo id, or a .gguf file")
    p.add_argument("--adapters", help="directory with one peft adapter folder per adapter")
    p.add_argument("--target-modules", help="comma-separated module names (instead of the adapters' own)")
    p.add_argument("--order", help="comma-separated adapter names [default: every folder in --adapters]")
    p.add_argument("--preload", action="append", default=[], metavar="NAME=MODEL_ID",
                   help="an adapter requests may add (preload_adapters); repeatable")
    p.add_argument("--base-model-id", help="base_model_id to write [default: --model]")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    model_type, n_layers = base_shape(a.model)
    order = [s.strip() for s in a.order.split(",") if s.strip()] if a.order else None
    if a.target_modules:
        targets: list[str] | str = [s.strip() for s in a.target_modules.split(",") if s.strip()]
    elif a.adapters:
        folders = sorted(f for f in Path(a.adapters).iterdir() if (f / "adapter_config.json").is_file())
        if not folders:
            fail(f"{a.adapters} has no adapter folders (none holds adapter_config.json).")
        order = order if order is not None else [f.name for f in folders]
        chosen = [Path(a.adapters) / n for n in order] or folders
        sets = {json.dumps(adapter_targets(f), sort_keys=True) for f in chosen}
        if len(sets) > 1:
            fail(f"the adapters in {a.adapters} target different modules ({' vs '.join(sorted(sets))}).")
        targets = json.loads(sets.pop())
    else:
        fail("pass --adapters (to read their target modules) or --target-modules.")
    preload = []
    for item in a.preload:
        name, sep, model_id = item.partition("=")
        if not sep or not name or not model_id:
            fail(f"--preload {item!r} must be NAME=MODEL_ID.")
        preload.append({"name": name, "adapter_model_id": model_id})
    out = {"base_model_id": a.base_model_id or a.model, "order": order or [],
           "layers": layers(model_type, n_layers, targets)}
    if preload:
        out["preload_adapters"] = preload
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
