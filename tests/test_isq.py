"""--isq: tiny random llamas (hidden 256 so K types fit; hidden 64 for mistral.rs's fallbacks),
phi3 (fused qkv) and mixtral (experts, router) quantized at load with each type:
- every linear layer (lm_head too) holds its type; embeddings and norms stay float;
- with exact numerics, our logits equal transformers' on the same model whose linear weights are
  replaced by our dequantized ones (so the only change ISQ makes is the weights);
- with the default numerics, the logit error against f32 transformers stays within a budget
  proportional to the weights' RMSE (the RMSE table's reasoning), and falls in the types' order;
- the CLI (`--isq` before and after the subcommand), Runner(isq=...), and one-line errors."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

import gguf_builder as gb
import parity
from mistralrs_cli.api import CompletionRequest, Runner, Which
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.quant.hqq import HQQ
from mistralrs_cli.quant.isq import ISQ_TYPES, layer_type, parse_isq
from mistralrs_cli.quant.qweight import FusedQLinear, QLinear
from mistralrs_cli.types import LoadOptions, PlainSpec

MISTRALRS = Path(sys.executable).with_name("mistralrs")
IDS = list(range(2, 40, 3))  # 13 tokens
# logit error / weight error: how much these random 2-layer models amplify weight noise
# (measured 3-9 across types and seeds; an unquantized or garbled layer lands far outside)
AMPLIFICATION = (1.0, 12.0)


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("isq")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small elementwise ops: 2 threads on a busy 2-core box cost 20x
    with pytest.MonkeyPatch.context() as mp:  # the user's cache: its native kernels build once
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path
    torch.set_num_threads(before)


def _save(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    gb.train_tokenizer().save(str(path / "tokenizer.json"))
    cfg = {"bos_token": gb.BOS, "eos_token": gb.EOS, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def models(env):
    """name -> (checkpoint dir, transformers model, its f32 logits on IDS)."""
    built = {
        "llama256": gb.tiny_llama(0, hidden_size=256, intermediate_size=512),
        "llama64": gb.tiny_llama(1, tie_word_embeddings=True),  # lm_head shares the embeddings
        "phi3": gb.tiny_phi3(2),
        "mixtral": gb.tiny_mixtral(3),
        "phi2": gb.tiny_phi2(4),
    }
    out = {}
    for name, hf in built.items():
        with torch.no_grad():
            logits = hf(torch.tensor([IDS])).logits[0]
        out[name] = (_save(hf, env / name), hf, logits)
    return out


def isq_load(path: Path, isq: str, numerics: str = "precise"):
    return load(PlainSpec(str(path)), LoadOptions(isq=isq, numerics=numerics))


def our_logits(loaded) -> torch.Tensor:
    return parity.our_steps(loaded.model, loaded.config, IDS, [])[0]


def quantized(model: nn.Module) -> dict[str, QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_names_and_fallback_table():
    assert parse_isq("q4k") == parse_isq("Q4_K") == parse_isq(" Q4K ") == Q.Q4_K
    assert parse_isq("hqq8") == HQQ.HQQ8 and parse_isq("Q8_0") == Q.Q8_0
    assert len(ISQ_TYPES) == 14
    with pytest.raises(UserError, match=r"^--isq Q9K is not a quantization type; use one of Q4_0, .*HQQ8\.$"):
        parse_isq("Q9K")
    # mistral.rs's get_fallback, then nothing when the fallback does not fit either
    assert [layer_type(t, 96) for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K)] == \
        [Q.Q4_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_1]
    assert layer_type(Q.Q4_K, 512) == Q.Q4_K and layer_type(Q.Q4_0, 48) is None
    assert layer_type(HQQ.HQQ4, 128) == HQQ.HQQ4 and layer_type(HQQ.HQQ4, 96) is None


@pytest.mark.parametrize("isq", list(ISQ_TYPES))
def test_every_linear_quantized_and_exact_against_transformers(models, isq):
    """Exact numerics: our ISQ model == transformers with our dequantized weights swapped in."""
    path, hf, _ = models["llama256"]
    loaded = isq_load(path, isq, numerics="exact")
    layers = quantized(loaded.model)
    hf_linears = {n for n, m in hf.named_modules() if isinstance(m, nn.Linear)}
    assert set(layers) == hf_linears and "lm_head" in layers  # attention, MLP and lm_head
    assert {m.qweight.qtype for m in layers.values()} == {parse_isq(isq)}
    assert isinstance(loaded.model.model.embed_tokens, nn.Embedding)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32
    # the float weights are gone: what parameters remain are the embeddings' and the norms'
    assert {n.split(".")[-2] for n, _ in loaded.model.named_parameters()} == {
        "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    swapped = copy.deepcopy(hf)
    with torch.no_grad():
        for name, lin in layers.items():
            swapped.get_submodule(name).weight.copy_(lin.qweight.dequantize())
        want = swapped(torch.tensor([IDS])).logits[0]
    assert rel(our_logits(loaded), want) < 1e-4


@pytest.fixture(scope="module")
def errors(models):
    """isq -> (relative logit error vs f32 transformers with default numerics, weight RMSE)."""
    path, hf, ref = models["llama256"]
    out = {}
    for isq in ISQ_TYPES:
        loaded = isq_load(path, isq)
        w_err = [rel(m.qweight.dequantize(), hf.get_submodule(n).weight.detach())
                 for n, m in quantized(loaded.model).items()]
        out[isq] = (rel(our_logits(loaded), ref), sum(w_err) / len(w_err))
    return out


@pytest.mark.parametrize("isq", list(ISQ_TYPES))
def test_logit_error_within_the_types_budget(errors, isq):
    err, w_err = errors[isq]
    lo, hi = AMPLIFICATION
    assert lo * w_err < err < hi * w_err, f"{isq}: logits off by {err:.4f} for weights off by {w_err:.4f}"


def test_errors_fall_in_the_types_order(errors, capsys):
    with capsys.disabled():
        print("\n| --isq | weight rel. RMSE | logit rel. error |\n|---|---|---|")
        for isq, (err, w_err) in sorted(errors.items(), key=lambda kv: kv[1][0]):
            print(f"| {isq} | {w_err:.4f} | {err:.4f} |")
    k = [errors[t][0] for t in ("Q8K", "Q6K", "Q5K", "Q4K", "Q3K", "Q2K")]
    assert k == sorted(k)
    assert errors["Q8_0"][0] < errors["Q5_0"][0] < errors["Q4_0"][0]
    assert errors["HQQ8"][0] < errors["HQQ4"][0]
    assert max(errors[t][0] for t in ("Q8_0", "Q8_1", "HQQ8")) < min(errors[t][0] for t in ("Q4_0", "Q4K", "HQQ4"))


def test_fallback_when_rows_are_not_256_blocks(models, caplog):
    """hidden 64: every K type falls back as mistral.rs does, with a notice."""
    path, _, ref = models["llama64"]
    with caplog.at_level(logging.WARNING):
        loaded = isq_load(path, "Q4K")
    layers = quantized(loaded.model)
    assert {m.qweight.qtype for m in layers.values()} == {Q.Q4_1} and "lm_head" in layers
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32  # tied, yet left float
    assert "use Q4_1 instead, as mistral.rs does" in caplog.text
    assert rel(our_logits(loaded), ref) < 0.5
    exact = isq_load(path, "Q4_1")
    assert torch.equal(our_logits(loaded), our_logits(exact))  # the same model as asking for Q4_1


@pytest.mark.parametrize("name, isq", [("phi3", "Q8_0"), ("mixtral", "Q6K"), ("mixtral", "HQQ8"),
                                       ("phi2", "Q5_1")])
def test_fused_and_expert_layers(models, name, isq):
    """Phi-3's fused qkv_proj / gate_up_proj, Mixtral's experts and router, and Phi-2's biased
    layers (lm_head too) are quantized and still run; separate q/k/v are fused after quantizing."""
    path, hf, ref = models[name]
    loaded = isq_load(path, isq)
    layers = quantized(loaded.model)
    assert {n for n, m in hf.named_modules() if isinstance(m, nn.Linear)} <= set(layers)
    w_err = sum(rel(m.qweight.dequantize(), _float_weight(hf, n)) for n, m in layers.items()) / len(layers)
    lo, hi = AMPLIFICATION
    assert lo * w_err < rel(our_logits(loaded), ref) < hi * w_err
    if name == "mixtral":
        assert any(n.endswith("block_sparse_moe.gate") for n in layers)
        assert sum(".experts." in n for n in layers) == 3 * 4 * 2  # w1..w3 x 4 experts x 2 layers
    fused = [m for m in loaded.model.modules() if isinstance(m, FusedQLinear)]
    assert bool(fused) == (name != "phi3")  # phi3 arrives fused
    if name == "phi2":
        assert layers["lm_head"].bias is not None and layers["model.layers.0.mlp.fc1"].bias is not None


def _float_weight(hf: nn.Module, name: str) -> torch.Tensor:
    """A layer's f32 weight in transformers' model, under our (hub) name: transformers 5 keeps
    Mixtral's experts stacked and names the MoE block `mlp`."""
    if ".block_sparse_moe." not in name:
        return hf.get_submodule(name).weight.detach()
    layer, rest = name.split(".block_sparse_moe.")
    moe = hf.get_submodule(layer + ".mlp")
    if rest == "gate":
        return moe.gate.weight.detach()
    _, e, w = rest.split(".")
    gate_up, down = moe.experts.gate_up_proj[int(e)].detach(), moe.experts.down_proj[int(e)].detach()
    return {"w1": gate_up.chunk(2)[0], "w3": gate_up.chunk(2)[1], "w2": down}[w]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_checkpoint_memory_map_released(models, env):
    """After ISQ nothing refers to the checkpoint's memory map any more, so the pages the
    quantizer read are unmapped (without ISQ the float weights live in that map)."""
    import shutil

    path = env / "llama64-maps"
    shutil.copytree(models["llama64"][0], path)
    weights = str(path / "model.safetensors")

    def mapped() -> bool:
        return weights in Path("/proc/self/maps").read_text()

    plain = load(PlainSpec(str(path)), LoadOptions())
    assert mapped()
    del plain
    loaded = isq_load(path, "Q8_0")
    assert quantized(loaded.model) and not mapped()


def test_progress_bar(models, monkeypatch):
    """The bar draws on a terminal and stays silent otherwise (and under -q)."""
    from mistralrs_cli.quant import isq

    assert not isq._show_progress(True)  # pytest's stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isq._show_progress(True) and not isq._show_progress(False)
    monkeypatch.setattr(isq.log, "isEnabledFor", lambda level: False)  # -q: errors only
    assert not isq._show_progress(True)
    ticks = []
    with isq._progress(3, True) as advance:
        for _ in range(3):
            ticks.append(advance())
    assert len(ticks) == 3


def test_runner_isq(models):
    path, _, _ = models["llama64"]
    runner = Runner(Which.Plain(str(path)), isq="hqq8")
    assert {m.qweight.qtype for m in quantized(runner.loaded.model).values()} == {HQQ.HQQ8}
    res = runner.send_completion_request(CompletionRequest(prompt="the quick", max_tokens=4, temperature=0.0))
    assert res.usage.completion_tokens == 4 and isinstance(res.choices[0].text, str)
    same = Runner(Which.Plain(str(path)), in_situ_quant="HQQ8")  # mistral.rs's Python spelling
    again = same.send_completion_request(CompletionRequest(prompt="the quick", max_tokens=4, temperature=0.0))
    assert again.choices[0].text == res.choices[0].text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MISTRALRS), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console script's main() in this process (a subprocess costs seconds of imports)."""
    from mistralrs_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["mistralrs", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def test_cli(models, monkeypatch, capsys):
    path = str(models["llama256"][0])
    before = _cli("--isq", "Q4K", "--raw", "--temperature", "0", "--prompt", "hi", "--max-tokens", "4", "plain", "-m", path)
    assert before.returncode == 0, before.stderr
    assert "generated: 4 tokens" in before.stderr and before.stdout.strip()
    code, out, _ = _in_process(monkeypatch, capsys, "--raw", "--temperature", "0", "--prompt", "hi", "--max-tokens", "4",
                               "plain", "-m", path, "--isq", "q4_k")
    assert code == 0 and out == before.stdout  # --isq after the subcommand, any spelling


@pytest.mark.parametrize("args, message", [
    (["--isq", "bogus", "--prompt", "hi", "plain", "-m", "MODEL"],
     "error: --isq bogus is not a quantization type; use one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, "
     "Q2K, Q3K, Q4K, Q5K, Q6K, Q8K, HQQ4, HQQ8."),
    (["--isq", "Q4_0", "--prompt", "hi", "gguf", "-f", "x.gguf"],
     "error: --isq applies to plain (safetensors) models; this GGUF file is already quantized, so run "
     "it without --isq."),
])
def test_cli_errors(models, monkeypatch, capsys, args, message):
    args = [str(models["llama64"][0]) if a == "MODEL" else a for a in args]
    code, out, err = _in_process(monkeypatch, capsys, *args)
    assert code == 1 and err.strip() == message and out == ""
