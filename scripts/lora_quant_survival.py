#!/usr/bin/env python3
"""How much of a LoRA adapter's effect survives on a quantized base, two ways: merged into the
float weights and then re-quantized (W' = Q(W + s·B·A)), or kept beside the quantized weight
(y = Q(W)·x + s·B(A·x), what lora-gguf / lora-ggml / --isq do).

A tiny random llama (run from the repo root; uses tests/tiny_models.py and tests/gguf_builder.py)
gets a peft adapter on all seven projections whose B is scaled so each module's delta is
--rel of its weight's norm (trained adapters are small next to the weights). peft's logit change
on the float model is the target; so is peft's change on the base dequantized from the
same blocks (what a quantized model with the adapter should show). Each way's change is measured
through our own loader on GGUF files (default numerics), as the fraction of a target along it
(projection) and the relative error of the change:

  python scripts/lora_quant_survival.py [--qtype Q4_0] [--rel 0.02] [--hidden 256]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [0, 5, 77, 300, 12, 9, 401, 33, 250, 17, 61, 88, 140, 7, 3, 499]


def main() -> None:
    import gguf
    import gguf_builder as gb
    from gguf import GGMLQuantizationType as Q
    from peft import LoraConfig, get_peft_model

    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.models.batch import SeqSlice
    from mistralrs_cli.types import GGUFSpec, LoadOptions, LoraSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qtype", default="Q4_0")
    p.add_argument("--rel", type=float, default=0.02, help="each module's |s·B·A| / |W| (Frobenius)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    a = p.parse_args()
    qtype = Q[a.qtype]
    d = Path(tempfile.mkdtemp())
    hf = gb.tiny_llama(0, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_attention_heads=8,
                       num_key_value_heads=4)
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=SEVEN,
                                                      init_lora_weights=False))
    with torch.no_grad():
        for name, m in pm.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                delta = m.get_delta_weight("default")
                m.lora_B["default"].weight.mul_(a.rel * m.base_layer.weight.norm() / delta.norm())
    pm.save_pretrained(d / "adapters" / "a1")
    merged = copy.deepcopy(pm).merge_and_unload()
    deq = copy.deepcopy(pm)  # peft's adapter on the dequantized base: the change the quantized model should get
    with torch.no_grad():
        for name, prm in deq.named_parameters():
            if prm.ndim == 2 and "lora_" not in name:
                w = prm.detach().float().numpy()
                prm.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)))
        x = torch.tensor([IDS])
        targets = {"peft on the float base": (pm(x).logits[0] - hf(x).logits[0]).flatten()}
        with deq.disable_adapter():
            deq_base = deq(x).logits[0]
        targets["peft on the dequantized base"] = (deq(x).logits[0] - deq_base).flatten()
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    base_path = gb.write_gguf(d / f"base.{qtype.name}.gguf", hf, vocab, qtype=qtype)
    merged_path = gb.write_gguf(d / f"merged.{qtype.name}.gguf", merged, vocab, qtype=qtype)
    layers = {f"model.layers.{i}.{part}.{m}": 0 for i in range(hf.config.num_hidden_layers)
              for part, ms in (("self_attn", SEVEN[:4]), ("mlp", SEVEN[4:])) for m in ms}
    (d / "o.json").write_text(json.dumps({"order": ["a1"], "layers": layers}))
    opts = LoadOptions(token_source="none")
    n = len(IDS)

    def logits(loaded, active: bool) -> torch.Tensor:
        bank = loaded.adapters
        w = bank.weights_for([(n, [0])]) if active and bank is not None else None
        out = loaded.model.step(IDS, list(range(n)), [SeqSlice(0, n, None)], list(range(n)), adapter_weights=w)
        return torch.from_numpy(out).flatten()

    side = load(LoraSpec(GGUFSpec(str(base_path)), str(d / "adapters"), str(d / "o.json")), opts)
    base_q = logits(side, False)
    changes = {"beside the quantized weight": logits(side, True) - base_q,
               "merged, then re-quantized": logits(load(GGUFSpec(str(merged_path)), opts), False) - base_q}
    for tname, target in targets.items():
        print(f"{qtype.name}, adapter delta {a.rel:.1%} of each weight; {tname}: logit change RMS "
              f"{float(target.pow(2).mean().sqrt()):.4f}")
        for name, c in changes.items():
            kept = float(c @ target / (target @ target))
            err = float((c - target).norm() / target.norm())
            print(f"  {name}: {kept:.1%} of that change along it, relative error of the change {err:.1%}")


if __name__ == "__main__":
    main()
