"""LoRA parity with peft: tiny random llama, mistral, phi3, qwen2 and gemma models with peft
adapters (init_lora_weights=False, so B is not zero; all seven projections, Phi-3's four fused
ones) give peft's logits through `lora` merged (no preloads) and unmerged (preload_adapters:
several adapter sets in one forward), through `lora-gguf` on F32 (1e-4) and on Q8_0 / Q4_0 files
(against peft on the dequantized base, within the base's own quantization error), and through
`lora-ggml`; the CLI and the Python API generate peft's greedy text."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from peft import LoraConfig, PeftModel, get_peft_model

import gguf_builder as gb
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import SeqSlice
from mistralrs_cli.types import GGMLSpec, GGUFSpec, LoadOptions, LoraSpec, PlainSpec

ROOT = Path(__file__).resolve().parents[1]
MISTRALRS = Path(sys.executable).with_name("mistralrs")
TOL = 1e-4
IDS = [0, 5, 77, 300, 12, 9, 401, 33, 250, 17]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = {"llama": (gb.tiny_llama, SEVEN), "mistral": (gb.tiny_mistral, SEVEN), "qwen2": (gb.tiny_qwen2, SEVEN),
         "gemma": (gb.tiny_gemma, SEVEN),
         "phi3": (gb.tiny_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])}
# two adapters of different ranks and scalings (a2: rslora) on the same modules
ADAPTERS = {"a1": dict(r=4, lora_alpha=8), "a2": dict(r=2, lora_alpha=3, use_rslora=True)}


def save_base(hf: torch.nn.Module, path: Path) -> Path:
    hf.save_pretrained(path)
    gb.train_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": gb.BOS, "eos_token": gb.EOS,
                                                            "add_bos_token": True}))
    return path


def save_adapters(hf: torch.nn.Module, targets: list[str], root: Path, seed: int = 0) -> Path:
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + i)
        pm = get_peft_model(copy.deepcopy(hf), LoraConfig(target_modules=targets, init_lora_weights=False, **kw))
        pm.save_pretrained(root / name)
    return root


def write_ordering(path: Path, model: Path, adapters: Path, order: list[str], preload: dict[str, Path] | None = None,
                   base_id: str | None = None) -> Path:
    args = [sys.executable, str(ROOT / "scripts" / "create_ordering.py"), "--model", str(model),
            "--adapters", str(adapters), "--order", ",".join(order), "-o", str(path)]
    for name, p in (preload or {}).items():
        args += ["--preload", f"{name}={p}"]
    if base_id:
        args += ["--base-model-id", base_id]
    subprocess.run(args, check=True)
    return path


def peft_logits(hf: torch.nn.Module, adapters: Path, active: list[str], ids: list[int] = IDS) -> torch.Tensor:
    """peft's logits with `active` adapters on (none: the base)."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        if not active:
            return model(torch.tensor([ids])).logits[0]
        pm = PeftModel.from_pretrained(model, str(adapters / active[0]), adapter_name=active[0])
        for name in active[1:]:
            pm.load_adapter(str(adapters / name), adapter_name=name)
        pm.base_model.set_adapter(active)
        return pm(input_ids=torch.tensor([ids])).logits[0]


def our_logits(loaded, sets: list[list[str]], ids: list[int] = IDS) -> list[torch.Tensor]:
    """One forward holding len(sets) copies of `ids`, each sequence with its own adapters."""
    n, bank = len(ids), loaded.adapters
    seqs = [SeqSlice(i * n, (i + 1) * n, None) for i in range(len(sets))]
    w = None
    if bank is not None and any(sets):
        w = bank.weights_for([(n, [bank.index(a) for a in s]) for s in sets])
    out = loaded.model.step(ids * len(sets), list(range(n)) * len(sets), seqs, list(range(n * len(sets))),
                            adapter_weights=w)
    return [torch.from_numpy(out[i * n:(i + 1) * n]) for i in range(len(sets))]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    make, targets = ARCHS[request.param]
    d = tmp_path_factory.mktemp(f"lora-{request.param}")
    hf = make(0)
    base = save_base(hf, d / "base")
    adapters = save_adapters(hf, targets, d / "adapters")
    return {"name": request.param, "hf": hf, "dir": d, "base": base, "adapters": adapters,
            "merged": write_ordering(d / "merged.json", base, adapters, ["a1"]),
            "preload": write_ordering(d / "preload.json", base, adapters, ["a1"], {"a2": adapters / "a2"}),
            "ref": {k: peft_logits(hf, adapters, k.split("+") if k else []) for k in ("", "a1", "a2", "a1+a2")}}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_merged_equals_peft(arch):
    opts = LoadOptions(token_source="none")
    loaded = load(LoraSpec(PlainSpec(str(arch["base"])), str(arch["adapters"]), str(arch["merged"])), opts)
    assert loaded.adapters is None and loaded.default_adapters == ["a1"]  # merged: no bank
    assert _diff(arch["ref"]["a1"], arch["ref"][""]) > 0.1  # the adapter changes the logits
    assert _diff(our_logits(loaded, [[]])[0], arch["ref"]["a1"]) < TOL


def test_unmerged_sets_in_one_forward_equal_peft(arch):
    """preload_adapters: a bank; four sequences with four adapter sets share one forward."""
    opts = LoadOptions(token_source="none")
    loaded = load(LoraSpec(PlainSpec(str(arch["base"])), str(arch["adapters"]), str(arch["preload"])), opts)
    assert loaded.adapters.names == ["a1", "a2"] and loaded.default_adapters == ["a1"]
    sets = [["a1"], [], ["a1", "a2"], ["a2"]]
    for s, ours in zip(sets, our_logits(loaded, sets)):
        assert _diff(ours, arch["ref"]["+".join(s)]) < TOL, s


def dequantized(hf: torch.nn.Module, qtype: Q) -> torch.nn.Module:
    """hf with every matrix through qtype and back (gguf-py's codec), as write_gguf stores them."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2 and qtype != Q.F32:
                w = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)))
    return model


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0], ids=["f32", "q8_0", "q4_0"])
def test_lora_gguf(arch, qtype):
    """Against peft on the dequantized base: --numerics exact (the torch path on exactly
    dequantized weights) within 1e-4: the strict check. A quantized file on the default numerics
    (the native runtime for llama-family files; activations rounded to ~16 bits) within 5x the
    base model's own error there (ours vs transformers on the same base, ~1.5e-3): the adapters
    move these logits by ~5 and the rounding error grows with the activations (measured up to 3.6x);
    a side path missing or wrong would be off by ~5."""
    d = arch["dir"]
    path = gb.write_gguf(d / f"base.{qtype.name}.gguf", arch["hf"], gb.gguf_vocab(gb.train_tokenizer()), qtype=qtype)
    spec = LoraSpec(GGUFSpec(str(path)), str(arch["adapters"]), str(arch["preload"]))
    deq = dequantized(arch["hf"], qtype)
    base_ref, lora_ref = peft_logits(deq, arch["adapters"], []), peft_logits(deq, arch["adapters"], ["a1", "a2"])
    for numerics in ("exact",) if qtype == Q.F32 else ("exact", "precise"):
        loaded = load(spec, LoadOptions(token_source="none", numerics=numerics))
        base, lora = our_logits(loaded, [[], ["a1", "a2"]])
        base_err, lora_err = _diff(base, base_ref), _diff(lora, lora_ref)
        bound = TOL if numerics == "exact" else 5 * base_err
        assert base_err < bound and lora_err < bound, (numerics, base_err, lora_err)


def test_lora_ggml(tmp_path):
    """A GGML v3 llama file (exact numerics) with the preloaded pair on."""
    from test_ggml import ROPE_THETA, write_ggjt

    hf = gb.tiny_llama(0)
    adapters = save_adapters(hf, SEVEN, tmp_path / "adapters", seed=5)
    tok = gb.train_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_ggjt(tmp_path / "tiny.bin", hf, gb.gguf_vocab(tok).tokens)
    save_base(hf, tmp_path / "tiny")  # the script reads its config.json
    order = write_ordering(tmp_path / "o.json", tmp_path / "tiny", adapters, ["a1"], {"a2": adapters / "a2"})
    spec = LoraSpec(GGMLSpec(str(path), None, None, str(tmp_path / "tokenizer.json"), 2, 1e-5, ROPE_THETA),
                    str(adapters), str(order))
    loaded = load(spec, LoadOptions(token_source="none", numerics="exact"))
    for s, ours in zip([["a1"], ["a1", "a2"]], our_logits(loaded, [["a1"], ["a1", "a2"]])):
        assert _diff(ours, peft_logits(hf, adapters, s)) < TOL


def _greedy_text(hf: torch.nn.Module, adapters: Path, prompt: str, steps: int) -> str:
    tok = gb.train_tokenizer()
    ids = [0] + tok.encode(prompt).ids
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapters / "a1"))
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
        logits = pm(input_ids=out).logits[0, len(ids) - 1:-1]
    top2 = logits.topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3  # no near-ties to argue about
    return tok.decode(out[0, len(ids):].tolist())


def test_cli_and_api_greedy_text_equal_peft(tmp_path):
    """`mistralrs lora` (merged) and `lora-gguf` (F32, unmerged: the a1 of the ordering's order is
    active by default), Runner(Which.Lora(...)) and Runner(Which.LoraGGUF(...)): peft's greedy
    continuation."""
    from mistralrs_cli import CompletionRequest, Runner, Which

    hf = gb.tiny_llama(0)
    base = save_base(hf, tmp_path / "base")
    adapters = save_adapters(hf, SEVEN, tmp_path / "adapters", seed=11)
    order = write_ordering(tmp_path / "o.json", base, adapters, ["a1"])
    gguf_path = gb.write_gguf(tmp_path / "base.gguf", hf, gb.gguf_vocab(gb.train_tokenizer()))
    prompt, steps = "the quick brown fox", 8
    want = _greedy_text(hf, adapters, prompt, steps)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(tmp_path / "c")}
    common = [str(MISTRALRS), "--raw", "--temperature", "0", "--max-tokens", str(steps), "--prompt", prompt]
    procs = [subprocess.Popen(common + ["lora", "-m", str(base), "-a", str(adapters), "-o", str(order)],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen(common + ["--numerics", "exact", "lora-gguf", "-f", str(gguf_path), "-a", str(adapters),
                                        "-o", str(order)], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)]
    runner = Runner(Which.Lora(model_id=str(base), adapters_model_id=str(adapters), order=str(order)),
                    token_source="none")
    res = runner.send_completion_request(CompletionRequest(prompt=prompt, max_tokens=steps, temperature=0.0))
    assert res.choices[0].text == want
    runner = Runner(Which.LoraGGUF(quantized_model_id=None, quantized_filename=str(gguf_path),
                                   adapters_model_id=str(adapters), order=str(order)), token_source="none",
                    numerics="exact")
    res = runner.send_completion_request(CompletionRequest(prompt=prompt, max_tokens=steps, temperature=0.0))
    assert res.choices[0].text == want
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.rstrip("\n") == want
