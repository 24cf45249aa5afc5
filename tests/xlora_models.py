"""The X-LoRA tests' tiny models and references (tests/test_xlora.py, tests/test_xlora_engine.py).

Three random PEFT LoRA adapters of a tiny llama (init_lora_weights=False, all seven linear
targets) and a seeded classifier make an X-LoRA model folder (xlora_config.json,
xlora_classifier.safetensors saved from the XLoraModel's classifier state_dict: peft's
save_pretrained is broken for X-LoRA, and peft needs the adapter names "0", "1", "2"). References:
peft's logits and get_latest_scalings for a whole sequence, and a greedy loop over peft's own
layers (with --tgt-non-granular-index's rule injected by hand).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch

import gguf_builder as gb
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.engine.request import Request
from mistralrs_cli.engine.scheduler import Scheduled
from mistralrs_cli.engine.xlora_step import XLoraStep
from mistralrs_cli.loaders.load import load
from mistralrs_cli.loaders.xlora import attach_xlora
from mistralrs_cli.models.batch import SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions, PlainSpec, SamplingParams

NAMES = ["0", "1", "2"]  # peft's X-LoRA loads its adapters as "0", "1", ... and activates them by key
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [0, 17, 260, 301, 44, 90, 412, 7, 33]
SPLIT = [0, 5, 6, 7, 8, 9]  # a 5-token prefill chunk, then one token per step
LOGIT_TOL, SCALING_TOL = 1e-4, 1e-5
# each varies one knob of the defaults (depth 1, softmax at temperature 1, no top-k, weight 1)
VARIANTS = {
    "defaults": {},
    "top_k_lora": {"top_k_lora": 2},
    "softmax_temperature": {"softmax_temperature": 0.3},
    "layerwise_scalings": {"layerwise_scalings": True},
    "global_scaling_weight": {"global_scaling_weight": 0.6},
    "scaling_pass_value": {"scaling_pass_value": 0.4},
    # peft weighs the scaling pass's adapters by global_scaling_weight too, after top-k
    "scaling_pass_weighted": {"scaling_pass_value": 0.4, "global_scaling_weight": 0.5, "top_k_lora": 1},
    "deep_topk_softmax": {"xlora_depth": 3, "xlora_size": 16, "top_k_lora": 2, "enable_softmax_topk": True,
                          "enable_softmax": False},
}


def _hf():
    return gb.tiny_llama(0)


def build_base(root: Path, hf=None, targets: list[str] = TARGETS) -> dict:
    """A tiny model (the llama by default) as a plain folder and an F32 GGUF, and three peft adapters
    of it on `targets`, under root."""
    from peft import LoraConfig, get_peft_model

    hf = _hf() if hf is None else hf
    plain = root / "plain"
    hf.save_pretrained(plain)
    tok = gb.train_tokenizer()
    tok.save(str(plain / "tokenizer.json"))
    (plain / "tokenizer_config.json").write_text(json.dumps({"bos_token": gb.BOS, "eos_token": gb.EOS}))
    gguf = gb.write_gguf(root / "tiny.gguf", hf, gb.gguf_vocab(tok))
    adapters = root / "adapters"
    for i, name in enumerate(NAMES):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2 + i, lora_alpha=4 + 2 * i, target_modules=targets,
                                                          init_lora_weights=False))
        with torch.no_grad():  # peft's random B is small: make each adapter move the logits clearly
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        pm.save_pretrained(adapters / name)
    return {"root": root, "plain": plain, "gguf": gguf, "adapters": adapters, "hf": hf}


def make_xlora(base, name: str, cfg: dict, classifier=None, hf=None):
    """An X-LoRA folder for `cfg` and peft's XLoraModel on the same files (on `hf`, default the
    tiny llama), with its classifier's seeded weights saved from its state_dict."""
    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import save_file

    folder = base["root"] / f"x_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    for n in NAMES:
        shutil.copytree(base["adapters"] / n, folder / n)
    model = copy.deepcopy(base["hf"] if hf is None else hf)
    model.config.use_cache = False  # peft's X-LoRA refuses a base that caches
    xc = XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters={n: str(folder / n) for n in NAMES}, **cfg)
    xm = get_peft_model(model, xc).eval()
    clf = xm.base_model.internal_xlora_classifier
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    state = classifier if classifier is not None else {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file(state, str(folder / "xlora_classifier.safetensors"))
    (folder / "xlora_config.json").write_text(json.dumps({"hidden_size": 64, "adapters": {n: n for n in NAMES},
                                                          "peft_type": "XLORA", **cfg}))
    return folder, xm


def peft_reference(xm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = xm(input_ids=torch.tensor([ids]))
    return out.logits[0].numpy(), xm.base_model.get_latest_scalings()[0].numpy()


def load_x(base, folder, fmt: str = "plain", tgt=None):
    if fmt == "plain":
        loaded = load(PlainSpec(str(base["plain"])), LoadOptions(token_source="none"))
    else:  # the torch executor on the GGUF (F32, exact numerics)
        loaded = load(GGUFSpec(str(base["gguf"])), LoadOptions(token_source="none", numerics="exact"))
    return attach_xlora(loaded, str(folder), tgt_non_granular_index=tgt)


def ours_chunked(loaded, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Our two passes over `ids` in SPLIT's chunks, each on its own KV cache: (logits, scalings)."""
    model = loaded.model
    xs = XLoraStep(model, loaded.xlora, loaded.adapters)
    xs.record = {}
    req = Request("r", list(ids), SamplingParams())
    req.cache = cache_for(model)
    logits = []
    for a, b in zip(SPLIT, SPLIT[1:]):
        w = xs.fill(None, [Scheduled(req, b - a)], b - a)
        logits.append(model.step(ids[a:b], list(range(a, b)), [SeqSlice(0, b - a, req.cache)], list(range(b - a)),
                                 adapter_weights=w))
        req.n_computed = b
    return np.concatenate(logits), np.concatenate(xs.record["r"])


def generate(engine: Engine, prompts: list[tuple[list[int], list[str] | None]], n: int) -> list[list[int]]:
    """Greedy continuations of every (prompt ids, adapters) added at once, stepped to the end."""
    reqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, adapters=names, ignore_eos=True))
            for ids, names in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def peft_greedy(xm, ids: list[int], n: int, tgt: int | None = None) -> list[int]:
    """The reference: peft's layers over the whole sequence each step. With `tgt`, the rule by
    hand: the scaling pass (the base model: scaling_pass_value 0) and peft's classifier give each
    position its scalings, and every position from prompt + tgt on takes those of the one before."""
    from peft.tuners.lora import LoraLayer

    seq, P = list(ids), len(ids)
    inner = xm.base_model.lora_model.model
    clf = xm.base_model.internal_xlora_classifier
    layers = [m for m in xm.modules() if isinstance(m, LoraLayer)]

    def run(scalings, x):
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "scalings": scalings}), with_kwargs=True)
                 for m in layers]
        try:
            return inner(x, output_hidden_states=True, return_dict=True)
        finally:
            for h in hooks:
                h.remove()

    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq])
            if tgt is None:
                logits = xm(input_ids=x).logits
            else:
                dummy = clf.make_dummy_scalings(input_ids=x)
                s = clf(result=run(dummy, x), input_ids=x).clone()
                if len(seq) > P + tgt:
                    s[:, P + tgt:] = s[:, P + tgt - 1:P + tgt]
                logits = run(s, x).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[P:]
