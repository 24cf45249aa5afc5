"""Batch invariance: 8 prompts run together give exactly the tokens each gives alone (greedy),
under every engine setting: the paged pool, the prefix cache, a pool so small that requests are
preempted and recomputed, tiny prefill chunks, --no-paged-attn and --no-kv-cache. The reference
is each prompt alone on the contiguous cache."""
from __future__ import annotations

import pytest

import gguf_builder as gb
from mistralrs_cli.api import Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.worker import EngineThread
from mistralrs_cli.types import EngineConfig, SamplingParams

TEXTS = ["the quick brown fox", "rain falls in spain mainly on plains", "why",
         "models read tokens, tokens become vectors, vectors become logits. " * 2,
         "12 or 345 numbers count too", "attention heads look back at keys and values",
         "seven wizards quietly hex jolly boxing frogs", "a lazy dog"]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def loaded(request, tmp_path_factory):
    tok = gb.train_tokenizer()
    model = gb.tiny_llama(0) if request.param == "llama" else gb.tiny_mistral(1)  # mistral: window 8
    path = gb.write_gguf(tmp_path_factory.mktemp("engine") / f"{request.param}.gguf", model, gb.gguf_vocab(tok))
    runner = Runner(Which.GGUF(None, str(path)))
    runner.prompts = [runner.tokenize_text(t) for t in TEXTS]
    return runner


def _run(loaded, cfg: EngineConfig, prompts: list[list[int]], params=GREEDY):
    engine = Engine(loaded.loaded, cfg)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert all(r.finish_reason == "length" for r in reqs)
    return [r.output_ids for r in reqs], engine


@pytest.fixture(scope="module")
def solo(loaded):
    ref = EngineConfig(paged_attn=False, prefix_cache_n=0)
    return [_run(loaded, ref, [p])[0][0] for p in loaded.prompts]


CONFIGS = {
    "paged": EngineConfig(),
    "small-blocks": EngineConfig(block_size=4),
    "chunked-prefill": EngineConfig(max_batch_tokens=5, block_size=4),
    "tiny-pool": EngineConfig(kv_tokens=64, block_size=4),
    "max-seqs-3": EngineConfig(max_seqs=3, block_size=8),
    "no-paged-attn": EngineConfig(paged_attn=False),
    "no-kv-cache": EngineConfig(no_kv_cache=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_equals_alone(loaded, solo, name):
    outs, engine = _run(loaded, CONFIGS[name], loaded.prompts)
    assert outs == solo
    if name == "tiny-pool":
        assert engine.scheduler.preemptions > 0  # the pool really was too small for all eight
    if engine.kv is not None:
        assert engine.kv.alloc.held_by_sequences() == 0


def test_prefix_cache_hits_and_gives_the_same_tokens(loaded, solo):
    cfg = EngineConfig(block_size=4, prefix_cache_n=16)
    engine = Engine(loaded.loaded, cfg)
    shared = loaded.prompts[3]  # the longest prompt: several full blocks
    outs = []
    for _ in range(2):  # the second time round, its blocks come from the cache
        req = engine.add_request(shared, GREEDY)
        while engine.has_unfinished():
            engine.step()
        outs.append(req.output_ids)
    assert outs == [solo[3], solo[3]]
    hits = engine.kv.alloc.hits
    assert hits == (len(shared) - 1) // 4
    # a batch of prompts that share that prefix, extended differently
    longer = [shared + p for p in loaded.prompts[:4]]
    ref = [_run(loaded, EngineConfig(paged_attn=False), [p])[0][0] for p in longer]
    reqs = [engine.add_request(p, GREEDY) for p in longer]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in reqs] == ref
    assert engine.kv.alloc.hits >= hits + 4 * (len(shared) // 4)
    assert engine.kv.alloc.held_by_sequences() == 0


def test_prefill_chunks_do_not_stall_running_decodes(loaded):
    """Decodes go first: while a long prompt prefills in chunks, a running stream still gets a
    token every step."""
    engine = Engine(loaded.loaded, EngineConfig(max_batch_tokens=4, block_size=4))
    short = engine.add_request(loaded.prompts[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    long_ = engine.add_request(loaded.prompts[3] * 3, GREEDY)
    for _ in range(5):
        before = len(short.output_ids)
        engine.step()
        assert len(short.output_ids) == before + 1
    assert 0 < long_.n_computed < len(long_.prompt_ids)


def test_engine_thread_streams_concurrent_requests(loaded, solo):
    worker = EngineThread(Engine(loaded.loaded, EngineConfig()))
    try:
        streams = [worker.stream(p, GREEDY) for p in loaded.prompts]
        texts = [[next(s)] for s in streams]  # all eight are in flight before any finishes
        for s, got in zip(streams, texts):
            got.extend(s)
        ids = [[o.token_id for o in outs] for outs in texts]
        assert ids == solo
        assert all(outs[-1].finish_reason == "length" for outs in texts)
        assert worker.call(lambda e: e.kv.alloc.held_by_sequences()) == 0
    finally:
        worker.stop(timeout=10)
