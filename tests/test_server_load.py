"""A bounded load test on SmolLM2: 32 concurrent streaming clients x 4 requests each through the
openai client. Every request completes without error and streams exactly the text its prompt
gives alone (greedy, one request at a time on the contiguous cache, no prefix cache).

The prompts share a system message and the pool uses 8-token blocks, so repeated and
overlapping prompts take their first blocks from the prefix cache (the hits are counted)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mistralrs_cli.api import Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, SamplingParams
from test_server import serve

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "What is 12 times 7?", "Say hello in Spanish.", "Why is the sky blue?",
             "Give me a word that rhymes with cat.", "What do bees make?"]
SYSTEM = ("You are a friendly assistant who answers in one short sentence. Keep answers brief, clear "
          "and correct, and never use lists.")
CLIENTS, PER_CLIENT, MAX_TOKENS = 32, 4, 8


@pytest.fixture(scope="module")
def smol(smollm2_path):
    loaded = Runner(Which.GGUF(None, str(smollm2_path))).loaded
    loaded.generation_config = {"temperature": 0.0}  # requests without settings are greedy: each equals its solo greedy run
    return loaded


def _msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def test_32_streaming_clients_equal_their_solo_outputs(smol):
    solo = {}
    ref = Engine(smol, EngineConfig(paged_attn=False, prefix_cache_n=0))
    for q in QUESTIONS:
        outs = list(ref.generate(chat_ids(smol, _msgs(q)), SamplingParams(max_tokens=MAX_TOKENS)))
        solo[q] = "".join(o.text for o in outs)
    with serve(smol, config=EngineConfig(block_size=8)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)

        def one_client(i: int) -> list[tuple[str, str, str]]:
            got = []
            for j in range(PER_CLIENT):
                q = QUESTIONS[(i + j) % len(QUESTIONS)]
                stream = client.chat.completions.create(model="smollm2", messages=_msgs(q), max_tokens=MAX_TOKENS,
                                                        stream=True)
                chunks = list(stream)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                got.append((q, text, finish[0] if finish else None))
            return got

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(one_client, range(CLIENTS)) for r in rs]
        hits = s.worker.call(lambda e: e.kv.alloc.hits)
        held = s.worker.call(lambda e: e.kv.alloc.held_by_sequences())
    assert len(results) == CLIENTS * PER_CLIENT
    assert all(finish in ("length", "stop") for _, _, finish in results)
    wrong = [(q, text, solo[q]) for q, text, _ in results if text != solo[q]]
    assert not wrong, wrong[:3]
    assert hits > 0 and held == 0
