"""Per-request LoRA adapters in the engine: six concurrent requests with different adapter sets
give what each gives alone, on the torch side path (a float base with preloads; an --isq base
whose q|k|v and gate|up multiplies are fused) and on the native runtime (a Q8_0 GGUF); the
active set, request names and their one-sentence errors; the side path's row independence.

The torch side path runs its two products in float64, so a row's delta is bit for bit the same
alone or batched (checked on the module); the base torch path itself is only within 1e-4 of
alone (tests/test_engine_batch.py says why), so whole-model runs are compared as that file does."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from peft import PeftModel

import gguf_builder as gb
from mistralrs_cli.adapters.bank import AdapterBank, AdapterFactors
from mistralrs_cli.adapters.torch_lora import LoraContext, LoraLinear, SidePath
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import GGUFSpec, LoadOptions, LoraSpec, PlainSpec, SamplingParams
from test_engine_batch import TEXTS, _drain, agree
from test_lora_peft import SEVEN, _diff, peft_logits, save_adapters, save_base, write_ordering

SETS = [None, [], ["a1"], ["a2"], ["a1", "a2"], ["a2", "a1"]]  # None: the active set (a1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-engine")
    hf = gb.tiny_llama(0)
    base = save_base(hf, d / "base")
    ad = save_adapters(hf, SEVEN, d / "adapters", seed=21)
    order = write_ordering(d / "o.json", base, ad, ["a1"], {"a2": ad / "a2"})
    gguf_path = gb.write_gguf(d / "base.Q8_0.gguf", hf, gb.gguf_vocab(gb.train_tokenizer()), qtype=Q.Q8_0)
    return {"hf": hf, "base": base, "adapters": ad, "order": order, "gguf": gguf_path,
            "merged": write_ordering(d / "m.json", base, ad, ["a1"])}


EXECUTORS = {"torch-f32": ("plain", None, False), "torch-isq-q8_0": ("plain", "Q8_0", False),
             "native-q8_0": ("gguf", None, True)}


@pytest.fixture(scope="module", params=list(EXECUTORS))
def loaded(request, env):
    kind, isq, exact = EXECUTORS[request.param]
    base = PlainSpec(str(env["base"])) if kind == "plain" else GGUFSpec(str(env["gguf"]))
    out = load(LoraSpec(base, str(env["adapters"]), str(env["order"])), LoadOptions(token_source="none", isq=isq))
    out.bit_for_bit = exact
    if kind == "gguf":  # a llama-family GGUF keeps the native runtime, its own side path
        from mistralrs_cli.backends.native_model import NativeModel

        assert isinstance(out.model, NativeModel) and out.model.adapter_bank is out.adapters
    return out


def _params(adapters):
    return SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=4,
                          adapters=adapters)


def test_six_sets_together_equal_alone(loaded):
    """One prompt, six adapter sets at once (the prefix cache must not hand one set's blocks to
    another) against each alone."""
    prompt = loaded.tokenizer.encode(TEXTS[3], add_special_tokens=True)
    alone = []
    for s in SETS:
        engine = Engine(loaded)
        alone += _drain(engine, [engine.add_request(prompt, _params(s))])
    engine = Engine(loaded)
    reqs = [engine.add_request(prompt, _params(s)) for s in SETS]
    assert [r.params.adapters for r in reqs] == [["a1"], [], ["a1"], ["a2"], ["a1", "a2"], ["a2", "a1"]]
    agree(loaded, _drain(engine, reqs), alone)
    firsts = [str(a[0].top_logprobs) for a in alone]  # the base, a1, a2, a1+a2 all differ
    assert len(set(firsts[1:5])) == 4 and firsts[0] == firsts[2]


def _peft_on_our_weights(env, loaded) -> None:
    """Our logits (base, both adapters) equal peft's on transformers' model given our
    dequantized quantized weights."""
    from test_lora_peft import our_logits

    hf = copy.deepcopy(env["hf"])
    with torch.no_grad():
        for name, m in loaded.model.named_modules():
            if isinstance(m, LoraLinear) or name == "lm_head":
                w = (m.base if isinstance(m, LoraLinear) else m).qweight.dequantize()
                hf.get_submodule(name).weight.copy_(w)
    for s, ours in zip([[], ["a1", "a2"]], our_logits(loaded, [[], ["a1", "a2"]])):
        assert _diff(ours, peft_logits(hf, env["adapters"], s)) < 1e-4


def test_isq_fused_side_path_equals_peft(env):
    """--isq Q8_0 --numerics exact: q|k|v and gate|up are fused quantized multiplies with the side
    path added to their columns."""
    opts = LoadOptions(token_source="none", isq="Q8_0", numerics="exact")
    loaded = load(LoraSpec(PlainSpec(str(env["base"])), str(env["adapters"]), str(env["order"])), opts)
    attn = loaded.model.model.layers[0].self_attn
    assert type(attn.qkv_proj).__name__ == "FusedLora"  # the fused multiply carries the adapters
    _peft_on_our_weights(env, loaded)


def test_re_isq_quantizes_adapted_layers(env):
    """The server's /v1/re_isq (isq_model on the served model) after adapters were attached to a
    float base: every adapted projection is quantized and the adapters still apply."""
    from mistralrs_cli.quant.isq import isq_model
    from mistralrs_cli.quant.qweight import QLinear

    loaded = load(LoraSpec(PlainSpec(str(env["base"])), str(env["adapters"]), str(env["order"])),
                  LoadOptions(token_source="none"))
    isq_model(loaded.model, "Q8_0", "exact", progress=False)
    wrapped = [m for m in loaded.model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base, QLinear) for m in wrapped)
    _peft_on_our_weights(env, loaded)


def test_active_set_and_errors(env):
    loaded = load(LoraSpec(PlainSpec(str(env["base"])), str(env["adapters"]), str(env["order"])),
                  LoadOptions(token_source="none"))
    engine = Engine(loaded)
    assert engine.adapter_names() == ["a1", "a2"] and engine.active_adapters == ["a1"]
    engine.set_active_adapters(["a2"])
    assert engine.add_request([0, 5, 7], _params(None)).params.adapters == ["a2"]
    with pytest.raises(UserError, match=r"^the request's adapters names math, which this model does not serve; "
                                        r"its adapters are a1, a2\.$"):
        engine.add_request([0, 5, 7], _params(["a1", "math"]))
    with pytest.raises(UserError, match="the adapters to activate names nope"):
        engine.set_active_adapters(["nope"])
    assert engine.active_adapters == ["a2"]  # unchanged by the refused call


def test_merged_adapters_are_always_on(env):
    loaded = load(LoraSpec(PlainSpec(str(env["base"])), str(env["adapters"]), str(env["merged"])),
                  LoadOptions(token_source="none"))
    engine = Engine(loaded)
    assert engine.adapter_names() == ["a1"] and loaded.adapters is None
    assert engine.add_request([0, 5], _params(["a1"])).params.adapters == ["a1"]
    with pytest.raises(UserError, match="leaves out a1, but the adapters are merged into the weights"):
        engine.add_request([0, 5], _params([]))


def test_side_path_rows_independent_bit_for_bit():
    """A row's delta is the same alone, in any batch and at any position in it; a row whose
    weights are zero gets exactly the base output."""
    rng = np.random.default_rng(0)
    fa = AdapterFactors("x", 0.7, {"model.layers.1.mlp.down_proj": (rng.standard_normal((8, 96), np.float32),
                                                                    rng.standard_normal((80, 8), np.float32))})
    fb = AdapterFactors("y", 2.0, {"model.layers.1.mlp.down_proj": (rng.standard_normal((4, 96), np.float32),
                                                                    rng.standard_normal((80, 4), np.float32))})
    bank = AdapterBank([fa, fb], n_layers=2)
    ctx = LoraContext()
    lin = LoraLinear(torch.nn.Linear(96, 80), SidePath(bank.targets["model.layers.1.mlp.down_proj"]), ctx)
    x = torch.from_numpy(rng.standard_normal((40, 96), np.float32))
    sets = [[0], [1], [0, 1], []] * 10
    side = lin.side

    def delta(rows: torch.Tensor, row_sets: list[list[int]]) -> torch.Tensor:
        """What LoraLinear adds to the base output, rounded to f32 as it adds it."""
        return side.delta(rows, torch.from_numpy(bank.weights_for([(1, s) for s in row_sets]).astype(np.float64))).float()

    with torch.no_grad():
        full = delta(x, sets)
        for t in range(40):
            assert torch.equal(delta(x[t:t + 1], [sets[t]])[0], full[t])
        for T in (2, 7, 33):
            assert torch.equal(delta(x[-T:], sets[-T:]), full[-T:])
        ctx.begin(bank.weights_for([(1, s) for s in sets]))
        y, base = lin(x), lin.base(x)
    assert torch.equal(y[3::4], base[3::4]) and not torch.equal(y[0], base[0])  # rows with no adapter: the base
    ref = bank.targets["model.layers.1.mlp.down_proj"].delta(x.numpy(), bank.weights_for([(1, s) for s in sets]))
    assert np.abs(full.numpy() - ref).max() < 1e-3  # bank.py's numpy reference (f32, deltas ~30)
