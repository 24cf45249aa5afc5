"""Grammar masks in the sampler and the engine (grammar/, engine/sampler.py, engine/engine.py).

The mask is checked by hand on small vectors; on the real models every output the engine calls
finished ("stop") is checked by an independent judge: jsonschema, re.fullmatch, or the literal
alternatives of a Lark grammar. EOS is allowed exactly where the grammar accepts (a huge EOS
bias cannot end a regex early, and ends it as soon as it may). Batching, preemption, the prefix
cache and --spec-ngram keep each sequence's grammar (greedy text equal to the request alone's).
"""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from mistralrs_cli.api import Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.sampler import distribution, sample
from mistralrs_cli.engine.speculative import SpecConfig
from mistralrs_cli.errors import UserError
from mistralrs_cli.grammar import check
from mistralrs_cli.types import EngineConfig, Grammar, SamplingParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def test_mask_comes_after_logit_bias_and_before_temperature():
    logits = np.array([1.0, 5.0, 2.0, 0.5], dtype=np.float32)
    allowed = np.array([True, False, True, True])
    assert sample(logits, [], SamplingParams(), mask=allowed).token == 2
    # logit_bias lifts token 3 above token 2; the mask still removes token 1 whatever its bias
    p = SamplingParams(logit_bias={3: 2.0, 1: 100.0})
    assert sample(logits, [], p, mask=allowed).token == 3
    probs = distribution(logits, [], SamplingParams(temperature=2.0), mask=allowed)
    want = np.exp(np.array([1.0, 2.0, 0.5]) / 2.0)
    assert probs[1] == 0 and np.allclose(probs[[0, 2, 3]], want / want.sum())
    # a mask shorter than the logits (the model's padded rows) disallows the rest
    assert distribution(logits, [], SamplingParams(temperature=1.0), mask=np.array([True]))[0] == 1.0


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Runner(Which.GGUF(None, str(smollm2_path)), token_source="none").loaded


def chat(loaded, text: str) -> list[int]:
    from mistralrs_cli.prompting import chat_ids

    return chat_ids(loaded, [{"role": "user", "content": text}])


def run(engine: Engine, reqs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str, int]]:
    """Every request added at once, stepped to the end: (text, finish_reason, tokens) each."""
    added = [engine.add_request(ids, p) for ids, p in reqs]
    texts = {r.id: [] for r in added}
    while engine.has_unfinished():
        for o in engine.step():
            texts[o.request_id].append(o.text)
    return [("".join(texts[r.id]), r.finish_reason, len(r.output_ids)) for r in added]


def test_json_schema_regex_and_lark_outputs_are_valid(smol):
    engine = Engine(smol)
    grammars = [Grammar("json_schema", json.dumps(PERSON)), Grammar("regex", r"[0-9]{3}-[a-z]{2,4}"),
                Grammar("lark", 'start: "yes" | "no" | "maybe"')]
    reqs = [(chat(smol, "Describe a person as JSON."), SamplingParams(temperature=t, seed=s, max_tokens=80, grammar=g))
            for g in grammars for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    outs = run(engine, reqs)
    for (ids, p), (text, reason, _) in zip(reqs, outs):
        assert reason == "stop", (p.grammar, text)
        if p.grammar.kind == "json_schema":
            jsonschema.validate(json.loads(text), PERSON)
            assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))  # compact: no whitespace
        elif p.grammar.kind == "regex":
            assert re.fullmatch(p.grammar.value, text)
        else:
            assert text in ("yes", "no", "maybe")


def test_eos_is_allowed_exactly_where_the_grammar_accepts(smol):
    engine = Engine(smol)
    push_eos = {i: 100.0 for i in smol.eos_ids}
    ids = chat(smol, "Pick a number.")
    (text, reason, n), = run(engine, [(ids, SamplingParams(max_tokens=20, logit_bias=push_eos,
                                                           grammar=Grammar("regex", "[0-9]{3}")))])
    assert reason == "stop" and re.fullmatch("[0-9]{3}", text)  # EOS could not cut it short
    (text, reason, n), = run(engine, [(ids, SamplingParams(max_tokens=20, logit_bias=push_eos,
                                                           grammar=Grammar("regex", "[0-9]{1,9}")))])
    # one digit token makes it accepting: EOS is allowed then, and its bias takes it at once
    assert reason == "stop" and re.fullmatch("[0-9]{1,9}", text) and n == 2


def greedy(g: Grammar, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, grammar=g)


def test_batch_preemption_and_prefix_cache_keep_each_sequences_grammar(smol):
    prompts = [chat(smol, t) for t in ("A person as JSON.", "Another person, as JSON please.",
                                        "Describe Ada Lovelace as JSON.", "Your favourite number?")]
    grammars = [Grammar("json_schema", json.dumps(PERSON)), Grammar("regex", r"(ab|cd){2,3}x"),
                Grammar("json_schema", json.dumps(PERSON)), Grammar("regex", "[1-9][0-9]{0,3}")]
    reqs = [(p, greedy(g)) for p, g in zip(prompts, grammars)]
    alone = [run(Engine(smol, EngineConfig(paged_attn=False)), [r])[0] for r in reqs]
    tiny_pool = Engine(smol, EngineConfig(kv_tokens=64, block_size=4))
    assert run(tiny_pool, reqs) == alone
    assert tiny_pool.scheduler.preemptions > 0  # recomputed sequences kept their grammar state
    cached = Engine(smol, EngineConfig(block_size=16))
    assert run(cached, reqs) == alone and run(cached, reqs) == alone
    assert cached.kv.alloc.hits > 0


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_speculative_drafts_are_checked_against_the_grammar(smol, draft):
    """Drafts (n-gram lookup, or SmolLM2 drafting for itself, unconstrained) are judged under the
    grammar's mask at each position: greedy text is the plain engine's, drafts are accepted, and
    sampled outputs still validate."""
    import dataclasses

    cfg = SpecConfig(gamma=4, ngram=2, cost_policy=False) if draft == "ngram" else \
        SpecConfig(gamma=4, draft=smol, cost_policy=False)  # the draft drafts for itself: always worth it
    spec = dataclasses.replace(smol, speculative=cfg)
    p = chat(smol, "Repeat: ab ab ab ab ab")
    reqs = [(p, greedy(Grammar("regex", "(ab ){3,6}"))), (p, greedy(Grammar("json_schema", json.dumps(PERSON))))]
    engine = Engine(spec)
    assert run(engine, reqs) == run(Engine(smol), reqs)
    assert engine.spec.accepted > 0
    sampled = [(chat(smol, "A person as JSON."), SamplingParams(temperature=1.0, seed=s, max_tokens=60,
                                                                grammar=Grammar("json_schema", json.dumps(PERSON))))
               for s in range(4)]
    for text, reason, _ in run(engine, sampled):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("g, says", [
    (Grammar("regex", "[a-"), "not a valid regex"),
    (Grammar("regex", "(?=a)b"), "look-around"),
    (Grammar("lark", "start: foo("), "not a valid Lark grammar"),
    (Grammar("lark", "start: bar"), "unknown name"),
    (Grammar("json_schema", '{"type": "object", "if": {}}'), "keyword or format that is not supported"),
    (Grammar("json_schema", '{"type": "string", "format": "nonsense"}'), "not supported"),
    (Grammar("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'), "Unsatisfiable"),
    (Grammar("json_schema", "{not json"), "not valid JSON"),
    (Grammar("regex", "[a&&b]"), "no token can start it"),
    (Grammar("yacc", "x"), "use one of regex, lark, json_schema, llguidance"),
])
def test_bad_grammars_are_one_sentence_naming_the_field(smol, g, says):
    with pytest.raises(UserError) as e:
        check(smol, g, "grammar.value")
    msg = str(e.value)
    assert msg.startswith("grammar.value ") and says in msg and "\n" not in msg
    with pytest.raises(UserError):  # the engine refuses it the same way (Python API, CLI)
        Engine(smol).add_request([1, 2, 3], greedy(g))


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return Runner(Which.GGUF(None, str(gemma3_path)), token_source="none").loaded


TEXTS = ["plain words", "  two spaces, tabs\t and\nnewlines", "naïve café ☕ 日本語 🙂", '{"a": [1, 2.5e-3]}']


@pytest.mark.parametrize("model", ["smol", "gemma"])
def test_llguidance_sees_each_tokens_exact_bytes(request, model):
    """llguidance's tokenizer (built from ours) turns our token ids back into the very text the
    tokenizers / sentencepiece libraries encoded, and knows the EOS and special tokens."""
    from mistralrs_cli.grammar.vocab import ll_tokenizer

    loaded = request.getfixturevalue(model)
    tok = loaded.tokenizer
    lltok = ll_tokenizer(tok, loaded.eos_ids)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert lltok.decode_bytes(ids) == tok.decode(ids).encode() == text.encode()
    assert sorted(lltok.eos_tokens) == sorted(loaded.eos_ids) and lltok.vocab_size == tok.vocab_size
    assert all(lltok.is_special_token(i) for i in loaded.eos_ids)
    assert ll_tokenizer(tok, loaded.eos_ids) is lltok  # built once per model


def test_gemma3_sentencepiece_vocabulary(gemma):
    loaded = gemma
    engine = Engine(loaded)
    reqs = [(chat(loaded, "Describe a person as JSON."), SamplingParams(temperature=1.0, seed=s, max_tokens=60,
                                                                         grammar=Grammar("json_schema", json.dumps(PERSON))))
            for s in range(3)] + [(chat(loaded, "A code?"), greedy(Grammar("regex", r"[A-Z]{2}-[0-9]{2}")))]
    for (_, p), (text, reason, _) in zip(reqs, run(engine, reqs)):
        assert reason == "stop", text
        if p.grammar.kind == "regex":
            assert re.fullmatch(p.grammar.value, text)
        else:
            jsonschema.validate(json.loads(text), PERSON)
