"""Speculative decoding (engine/speculative.py): greedy output is token for token the target's
own, whatever the draft (an unrelated model, a noisy copy of the target, the target itself),
alone and batched, on the paged and the contiguous cache, with prefix-cache hits and preemption,
with stops inside accepted runs, through the engine, the Python API, the CLI and the server; with
temperature 1 the output distribution is the target's (chi-square over 2000 seeds) where a wrong
acceptance rule fails (tests/test_speculative_sampling.py); n-gram drafting; gamma adapting;
bad gamma and a draft of another vocabulary are one clear sentence. The cost policy that turns
drafts down: tests/test_speculative_policy.py.

The target runs on the native runtime (a Q8_0 tiny llama), whose verify chunks compute each row
exactly as a decode step does (test_engine_batch.py), so "identical" is bit for bit."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.api import CompletionRequest, Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import EngineConfig, GGUFSpec, LoadOptions, SamplingParams, SpeculativeSpec

MISTRALRS = Path(sys.executable).parent / "mistralrs"
OPTS = LoadOptions(token_source="none")
TEXTS = ["the quick brown fox", "rain falls in spain mainly on plains", "why",
         "models read tokens, tokens become vectors, vectors become logits. " * 2,
         "12 or 345 numbers count too", "attention heads look back at keys and values",
         "seven wizards quietly hex jolly boxing frogs", "a lazy dog"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)


def noisy_copy(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """The target with every weight perturbed: a draft that agrees often, not always."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(std * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    tok = gb.train_tokenizer()
    vocab = gb.gguf_vocab(tok)
    out = {"tok": tok, "target": gb.write_gguf(d / "target.gguf", gb.tiny_llama(0), vocab, qtype=Q.Q8_0),
           "unrelated": gb.write_gguf(d / "unrelated.gguf", gb.tiny_llama(5, num_hidden_layers=1), vocab, qtype=Q.Q8_0),
           "noisy": gb.write_gguf(d / "noisy.gguf", noisy_copy(gb.tiny_llama(0), 0.003, 1), vocab, qtype=Q.Q8_0)}
    out["self"] = out["target"]
    small = gb.train_tokenizer(400)
    out["other_vocab"] = gb.write_gguf(d / "other.gguf", gb.tiny_llama(0, vocab_size=400), gb.gguf_vocab(small), qtype=Q.Q8_0)
    return out


@pytest.fixture(scope="module")
def target(files):
    return load(GGUFSpec(str(files["target"])), OPTS)


@pytest.fixture(scope="module")
def prompts(files):
    return [files["tok"].encode(t).ids for t in TEXTS]


def _spec(files, draft: str, gamma: int = 4):
    """The pair with the cost policy off: the tiny draft costs what the target does, so the policy
    would rightly keep drafts off; these tests are about what drafting does when it runs."""
    loaded = load(SpeculativeSpec(GGUFSpec(str(files["target"])), GGUFSpec(str(files[draft])), gamma), OPTS)
    loaded.speculative.cost_policy = False
    return loaded


def _run(loaded, prompts, params=GREEDY, cfg: EngineConfig | None = None):
    engine = Engine(loaded, cfg)
    reqs = [engine.add_request(p, params) for p in prompts]
    outs = {r.id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.text
            if o.token_id is not None:
                outs[o.request_id].append((o.token_id, o.logprob))
    return [outs[r.id] for r in reqs], engine


@pytest.fixture(scope="module")
def reference(target, prompts):
    """Each prompt alone on the target, no draft: what speculation must reproduce."""
    return [_run(target, [p])[0][0] for p in prompts]


@pytest.mark.parametrize("draft", ["unrelated", "noisy", "self"])
@pytest.mark.parametrize("paged", [True, False])
def test_greedy_identity_alone_and_batched(files, prompts, reference, draft, paged):
    loaded = _spec(files, draft)
    cfg = EngineConfig(paged_attn=paged)
    alone = [_run(loaded, [p], cfg=cfg)[0][0] for p in prompts[:3]]
    assert alone == reference[:3]
    batched, engine = _run(loaded, prompts, cfg=cfg)
    assert batched == reference  # every token and log-probability
    spec = engine.spec
    assert spec.runs > 0
    if draft == "self":
        assert spec.acceptance_rate == 1.0
    if draft == "noisy":  # a close copy: most of its tokens pass
        assert spec.acceptance_rate > 0.5


def test_gamma_fixed_and_max_tokens_exact(files, prompts, reference):
    loaded = _spec(files, "self", gamma=5)
    loaded.speculative.fixed = True
    for n in (1, 2, 6, 7):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=True)
        out, _ = _run(loaded, prompts[:2], params)
        assert out == [r[:n] for r in reference[:2]]


def test_no_kv_cache_turns_speculation_off_with_a_warning(files, prompts, reference, caplog):
    """Verifying drafts rolls the cache back, so without one the engine says it runs no drafts."""
    loaded = _spec(files, "self")
    with caplog.at_level(logging.WARNING, logger="mistralrs_cli.engine.engine"):
        out, engine = _run(loaded, prompts[:1], cfg=EngineConfig(no_kv_cache=True))
    assert engine.spec is None
    assert "speculative decoding is off: it does not run with --no-kv-cache" in caplog.text
    assert [t for t, _ in out[0]] == [t for t, _ in reference[0]]


def test_api_runner(files, prompts, reference):
    runner = Runner(Which.GGUF(None, str(files["target"])), token_source="none",
                    which_draft=Which.GGUF(None, str(files["noisy"])), speculative_gamma=3)
    plain = Runner(Which.GGUF(None, str(files["target"])), token_source="none")
    runner.engine.spec.cfg.cost_policy = False  # (see _spec)
    req = CompletionRequest(prompt=TEXTS[0], max_tokens=20, temperature=0.0)
    assert runner.send_completion_request(req).choices[0].text == plain.send_completion_request(req).choices[0].text
    assert runner.engine.spec.runs > 0


def test_cli(files):
    args = ["--prompt", "the quick", "--max-tokens", "16", "--temperature", "0"]
    base = subprocess.run([str(MISTRALRS), *args, "gguf", "-f", str(files["target"])], capture_output=True, text=True)
    spec = subprocess.run([str(MISTRALRS), *args, "speculative", "-f", str(files["target"]),
                           "--draft-file", str(files["noisy"]), "-n", "3", "--gamma-fixed"], capture_output=True,
                          text=True)  # fixed: drafts every step (the cost policy may keep a same-size draft off)
    assert base.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == base.stdout
    assert "draft tokens accepted" in spec.stderr.splitlines()[-1]


@pytest.mark.parametrize("gamma", ["0", "-2"])
def test_bad_gamma_is_one_line(files, gamma):
    r = subprocess.run([str(MISTRALRS), "--prompt", "x", "speculative", "-f", str(files["target"]),
                        "--draft-file", str(files["noisy"]), "-n", gamma], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: -n/--gamma is {gamma}; give the number of draft tokens "
                                             "per step, a whole number of 1 or more."]
    with pytest.raises(UserError, match="speculative_gamma is 0"):
        Runner(Which.GGUF(None, str(files["target"])), token_source="none",
               which_draft=Which.GGUF(None, str(files["noisy"])), speculative_gamma=0)


def test_vocab_mismatch_is_one_line(files):
    r = subprocess.run([str(MISTRALRS), "--prompt", "x", "speculative", "-f", str(files["target"]),
                        "--draft-file", str(files["other_vocab"])], capture_output=True, text=True)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1 and "different vocabulary (400 tokens)" in lines[0] and "(512 tokens)" in lines[0], r.stderr


# ---- the engine's other paths: prefix cache, preemption, stops, the server ----
def test_prefix_cache_hits(files, prompts, reference):
    loaded = _spec(files, "noisy")
    engine = Engine(loaded, EngineConfig(block_size=4))
    for _ in range(2):  # the second round finds every prompt's blocks in the prefix cache
        reqs = [engine.add_request(p, GREEDY) for p in prompts]
        outs = {r.id: [] for r in reqs}
        while engine.has_unfinished():
            for o in engine.step():
                if o.token_id is not None:
                    outs[o.request_id].append((o.token_id, o.logprob))
        assert [outs[r.id] for r in reqs] == reference
    assert engine.kv.alloc.hits > 0 and engine.spec.accepted > 0


def test_preemption(files, prompts, reference):
    loaded = _spec(files, "noisy")
    out, engine = _run(loaded, prompts, cfg=EngineConfig(block_size=4, kv_tokens=160, prefix_cache_n=0))
    assert engine.scheduler.preemptions > 0 and engine.spec.accepted > 0
    assert out == reference
    pool = engine.spec.source.pool  # the draft's caches were blocks of its own pool, all given back
    assert pool is not None and pool.alloc.n_blocks == engine.kv.alloc.n_blocks
    assert pool.alloc.n_free() == pool.alloc.n_blocks and not engine.spec.source.caches


def test_draft_pool_running_out(files, prompts, reference):
    """A draft pool far smaller than the target's: sequences without draft blocks draft less
    (or nothing) that step; the output is still the target's and every block comes back."""
    from mistralrs_cli.engine.paged import PagedKV

    loaded = _spec(files, "noisy")
    engine = Engine(loaded, EngineConfig(block_size=4))
    src = engine.spec.source
    src.pool = PagedKV(src.pool.shape, 12, 4, 0, src.pool.round_to)  # 48 tokens for 8 sequences
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    outs = {r.id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.text
            if o.token_id is not None:
                outs[o.request_id].append((o.token_id, o.logprob))
    assert [outs[r.id] for r in reqs] == reference and engine.spec.accepted > 0
    assert src.pool.alloc.n_free() == 12 and not src.caches


def test_stops_inside_an_accepted_run(files, prompts, target):
    """The target itself as the draft: every token comes inside an accepted run; a stop string,
    a stop token id and max_tokens still end the text exactly where the target alone ends it."""
    loaded = _spec(files, "self", gamma=5)
    loaded.speculative.fixed = True
    tok = files["tok"]
    ref = _run(target, prompts[:1])[0][0]
    text = tok.decode([t for t, _ in ref])
    cases = [SamplingParams(temperature=0.0, max_tokens=24, stop=[text[9:12]]),
             SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[ref[7][0]])]
    for params in cases:
        want = list(Engine(target).generate(prompts[0], params))
        got = list(Engine(loaded).generate(prompts[0], params))
        assert [(o.token_id, o.text, o.finish_reason) for o in got] == \
               [(o.token_id, o.text, o.finish_reason) for o in want]
        assert want[-1].finish_reason == "stop" and len(want) < 20


def test_server_streaming(files, target):
    from test_server import serve

    loaded = _spec(files, "noisy")
    texts = []
    for model in (target, loaded):
        with serve(model) as srv:
            stream = srv.client.completions.create(model="x", prompt=TEXTS[1], max_tokens=20, temperature=0.0,
                                                   stream=True)
            chunks = [c.choices[0].text for c in stream if c.choices]
            texts.append(("".join(chunks), len(chunks)))
            if model is loaded:
                assert srv.worker.engine.spec.accepted > 0
    assert texts[0] == texts[1]  # the same text, one chunk per token


# ---- n-gram speculation (no draft model) ----
REPEAT = "the quick brown fox jumps over a lazy dog. " * 4


def test_ngram_greedy_identity_and_acceptance(files, prompts, reference):
    loaded = load(GGUFSpec(str(files["target"])), LoadOptions(token_source="none", spec_ngram=2))
    out, engine = _run(loaded, prompts)
    assert out == reference
    tok = files["tok"]
    rep = tok.encode(REPEAT).ids
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True)
    target = load(GGUFSpec(str(files["target"])), OPTS)
    want, _ = _run(target, [rep], params)
    got, engine = _run(loaded, [rep], params)
    assert got == want
    assert engine.spec.accepted > 0


def test_ngram_cli_and_api(files):
    args = ["--prompt", REPEAT, "--max-tokens", "24", "--temperature", "0"]
    base = subprocess.run([str(MISTRALRS), *args, "gguf", "-f", str(files["target"])], capture_output=True, text=True)
    ngram = subprocess.run([str(MISTRALRS), "--spec-ngram", "2", *args, "gguf", "-f", str(files["target"])],
                           capture_output=True, text=True)
    assert ngram.returncode == 0 and ngram.stdout == base.stdout, ngram.stderr
    bad = subprocess.run([str(MISTRALRS), "--spec-ngram", "0", *args, "gguf", "-f", str(files["target"])],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        "error: --spec-ngram is 0; give how many trailing tokens to look up, a whole number of 1 or more.")
    with pytest.raises(UserError, match="^speculative_ngram is -1;"):
        Runner(Which.GGUF(None, str(files["target"])), token_source="none", speculative_ngram=-1)
    runner = Runner(Which.GGUF(None, str(files["target"])), token_source="none", speculative_ngram=3)
    assert runner.engine.spec is not None


def test_gamma_adapts_per_sequence(files, prompts):
    """A draft that is always right keeps gamma at its most; one rarely right falls to 1 draft
    token and pauses between tries; --gamma-fixed always proposes gamma."""
    seen = {}
    for draft, fixed in (("self", False), ("unrelated", False), ("unrelated", True)):
        loaded = _spec(files, draft, gamma=4)
        loaded.speculative.fixed = fixed
        engine = Engine(loaded)
        req = engine.add_request(prompts[0], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        proposed = []
        while engine.has_unfinished():
            before, room, decoding = engine.spec.proposed, 40 - len(req.output_ids) - 1, bool(req.output_ids)
            engine.step()
            if room >= 4 and decoding:  # decoding, and max_tokens does not cap the drafts
                proposed.append(engine.spec.proposed - before)
        seen[draft, fixed] = proposed
        assert req.finish_reason == "length"
    assert set(seen["self", False]) == {4}
    tries = seen["unrelated", False]
    assert [n for n in tries if n][-5:] == [1] * 5 and tries.count(0) > 5
    assert set(seen["unrelated", True]) == {4}


def test_usage_extra_fields(files):
    """The server's usage counts the request's draft tokens and accepted ones; the target as its
    own draft accepts every one."""
    from test_server import serve

    loaded = _spec(files, "self", gamma=4)
    loaded.speculative.fixed = True
    with serve(loaded) as srv:
        r = srv.client.completions.create(model="x", prompt=TEXTS[1], max_tokens=11, temperature=0.0)
    use = r.usage.model_dump()
    # the first token from the prefill, then two runs of 4 drafts + 1: 10 tokens, 8 drafted
    assert use["completion_tokens"] == 11
    assert (use["speculative_draft_tokens"], use["speculative_accepted_tokens"]) == (8, 8)
    assert use["speculative_acceptance_rate"] == 1.0 and use["speculative_mean_accepted_length"] == 5.0


def test_plain_checkpoints_and_draft_isq(tmp_path, files):
    """Plain (safetensors) target and draft, the draft quantized at load with --draft-isq; and a
    GGUF target with a plain draft: the target's greedy text."""
    import json

    for name, model in (("target", gb.tiny_llama(0)), ("draft", noisy_copy(gb.tiny_llama(0), 0.003, 1))):
        model.save_pretrained(tmp_path / name)
        files["tok"].save(str(tmp_path / name / "tokenizer.json"))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"bos_token": gb.BOS, "eos_token": gb.EOS}))
    args = ["--raw", "--prompt", "the quick", "--max-tokens", "16", "--temperature", "0"]
    runs = {"alone": ["plain", "-m", str(tmp_path / "target")],
            "plain pair": ["speculative", "-m", str(tmp_path / "target"), "-d", str(tmp_path / "draft"),
                           "--draft-isq", "Q8_0", "--gamma-fixed"],  # drafts every step (see _spec)
            "gguf + plain": ["speculative", "-f", str(files["target"]), "-d", str(tmp_path / "draft")],
            "gguf alone": ["gguf", "-f", str(files["target"])]}
    out = {k: subprocess.run([str(MISTRALRS), *args, *v], capture_output=True, text=True) for k, v in runs.items()}
    assert all(r.returncode == 0 for r in out.values()), {k: r.stderr[-300:] for k, r in out.items()}
    assert out["plain pair"].stdout == out["alone"].stdout
    assert out["gguf + plain"].stdout == out["gguf alone"].stdout
    assert "draft tokens accepted" in out["plain pair"].stderr


def test_larger_draft_is_a_warning(tmp_path, files, caplog):
    big = gb.write_gguf(tmp_path / "big.gguf", gb.tiny_llama(7, num_hidden_layers=4), gb.gguf_vocab(files["tok"]),
                        qtype=Q.Q8_0)
    with caplog.at_level("WARNING"):
        loaded = load(SpeculativeSpec(GGUFSpec(str(files["target"])), GGUFSpec(str(big)), 3), OPTS)
    assert loaded.speculative.draft is not None
    assert any("is larger than the target" in r.getMessage() for r in caplog.records)


def test_bench_reports_acceptance(files):
    r = subprocess.run([str(MISTRALRS.parent / "mistralrs-bench"), "-p", "0", "-g", "8", "-r", "1", "speculative",
                        "-f", str(files["target"]), "--draft-file", str(files["target"]), "--gamma-fixed"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| tg 8 |" in r.stdout
    assert "speculative: " in r.stderr and "(100%)" in r.stderr
