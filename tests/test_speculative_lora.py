"""Speculation on a LoRA target: the draft is the base alone (quantized, no adapters), the target
the base with its adapters (an F16 GGUF on the native runtime: csrc/floatmm.c beside lora.c's
side paths). Greedy output, per request adapter set, alone and four at once, is token for token
what the LoRA target gives without a draft; the draft's proposals mostly pass."""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import GGUFSpec, LoadOptions, LoraSpec, SamplingParams, SpeculativeSpec
from test_lora_peft import SEVEN, save_adapters, save_base, write_ordering

OPTS = LoadOptions(token_source="none")
SETS = [None, [], ["a1"], ["a1", "a2"]]  # None: the active set (a1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec-lora")
    hf = gb.tiny_llama(0)
    base = save_base(hf, d / "base")
    ad = save_adapters(hf, SEVEN, d / "adapters", seed=21)
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    return {"target": LoraSpec(GGUFSpec(str(gb.write_gguf(d / "base.F16.gguf", hf, vocab, qtype=Q.F16))), str(ad),
                               str(write_ordering(d / "o.json", base, ad, ["a1"], {"a2": ad / "a2"}))),
            "draft": GGUFSpec(str(gb.write_gguf(d / "base.Q8_0.gguf", hf, vocab, qtype=Q.Q8_0)))}


def _run(loaded, prompts, sets):
    engine = Engine(loaded)
    reqs = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, adapters=s))
            for p, s in zip(prompts, sets)]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs], engine


def test_greedy_identity_on_a_lora_target(env):
    target = load(env["target"], OPTS)
    assert isinstance(target.model, NativeModel) and target.model.adapter_bank is not None
    pair = load(SpeculativeSpec(env["target"], env["draft"], 4), OPTS)
    pair.speculative.cost_policy = False  # draft every step (the tiny draft costs what the target does)
    tok = pair.tokenizer
    prompts = [tok.encode(t) for t in ("the quick brown fox", "rain falls in spain", "why", "a lazy dog")]
    want = [_run(target, [p], [s])[0][0] for p, s in zip(prompts, SETS)]
    assert len({tuple(w) for w in want}) > 1  # the adapter sets do change the text
    alone = [_run(pair, [p], [s])[0][0] for p, s in zip(prompts, SETS)]
    together, engine = _run(pair, prompts, SETS)
    assert alone == want and together == want
    assert engine.spec.runs > 0 and engine.spec.accepted > 0
