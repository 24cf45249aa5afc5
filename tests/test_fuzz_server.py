"""Hypothesis against the running server: request bodies built from the JSON field names of
/v1/chat/completions and /v1/completions, each field given a plausible value at its edges or any
JSON value (random types, nesting, NaN), plus random bytes and broken JSON. Every response must
be a 2xx (a stream without an error event) or a 4xx in OpenAI's error shape: never a 5xx, never a
hang (each request has a timeout). Afterwards /health is ok, the engine holds no block and a
normal request gets transformers' greedy text.

CI runs a fixed, derandomized set (~1 minute here); for a longer hunt by hand:
    MISTRALRS_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q -s tests/test_fuzz_server.py
(the number is per test; -s prints how many requests ran and which statuses came back, and
FUZZ_DEBUG=1 adds the 30 most frequent 4xx messages)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralrs_cli.validation import Limits
from test_server import serve, tiny  # noqa: F401 - the module's tiny model fixture
from test_server_hostile import still_serving

EXAMPLES = int(os.environ.get("MISTRALRS_FUZZ_EXAMPLES", "0"))
TIMEOUT = 30  # seconds per request: a hang fails the example
CONTEXT = 40
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
SEEN: Counter = Counter()
MESSAGES: Counter = Counter()


@pytest.fixture(scope="module")
def srv(tiny):  # noqa: F811
    # a 40-token context, 4 new tokens unless a body asks for more, at most 4 choices: one example
    # with n=128 x 512 tokens would eat the whole budget (the server's parsing and checks are what
    # is fuzzed here, not the model)
    cfg = dataclasses.replace(tiny.loaded.config, max_position_embeddings=CONTEXT)
    loaded = dataclasses.replace(tiny.loaded, config=cfg, generation_config={"temperature": 0.0, "max_tokens": 4})
    with serve(loaded) as s:
        s.state.limits = Limits(max_n=4)
        yield s
        still_serving(s, tiny)
        print(f"\nfuzz_server: {sum(SEEN.values())} requests, statuses {dict(sorted(SEEN.items()))}")
        for m, k in MESSAGES.most_common(30):
            print(k, m)


# ---- values ----
edge_ints = st.sampled_from([-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 5, 20, 21, CONTEXT - 1, CONTEXT, CONTEXT + 1,
                             2**31, 2**63, 10**30])
edge_floats = st.sampled_from([-1e308, -2.5, -2.0, -1.0, -1e-9, 0.0, 1e-9, 0.5, 1.0, 1.5, 2.0, 2.5, 100.0, 1e308,
                               math.inf, -math.inf, math.nan])
# (lone surrogates are left to the raw-bytes test: one anywhere in a body ends it at a 400)
text = st.text(max_size=40) | st.sampled_from(["", "\x00", "</s>", "<s>", "{{ x }}", "\n" * 5, "é" * 30])
scalars = st.none() | st.booleans() | edge_ints | st.integers() | edge_floats | st.floats() | text
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
                        max_leaves=12)
token_ids = st.lists(st.integers(0, 511), min_size=1, max_size=8) | st.lists(st.integers(-2, 520) | edge_ints, max_size=8)


def field(plausible):
    """A field's value: plausible for it (most often) or anything JSON can say."""
    return st.one_of(plausible, plausible, plausible, any_json)


small_int = st.integers(-2, 6) | edge_ints
number = st.floats(-3, 3) | st.integers(-3, 3) | edge_floats
COMMON = {
    "model": field(text), "temperature": field(number), "top_p": field(number), "top_k": field(small_int),
    "min_p": field(number), "max_tokens": field(small_int), "max_completion_tokens": field(small_int),
    "n": field(small_int), "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "stop": field(text | st.lists(text, max_size=20)), "seed": field(small_int),
    "presence_penalty": field(number), "frequency_penalty": field(number), "repetition_penalty": field(number),
    "repeat_last_n": field(small_int), "ignore_eos": field(st.booleans()),
    "logit_bias": field(st.dictionaries(st.integers(-2, 520).map(str) | text, number, max_size=4)),
    "stop_token_ids": field(token_ids), "user": field(text),
    "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])})),
    "tools": field(st.lists(any_json, max_size=2)), "tool_choice": field(text), "grammar": field(any_json),
    "adapters": field(st.lists(text, max_size=2)),
}
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                             optional={"text": field(text), "image_url": any_json})
role = st.sampled_from(["system", "user", "assistant", "tool", "x"])
good_message = st.fixed_dictionaries({"role": role, "content": field(text | st.lists(part, max_size=3))},
                                     optional={"name": field(text)})
message = st.one_of(good_message, good_message, good_message,
                    st.fixed_dictionaries({}, optional={"role": field(role), "content": any_json}))
CHAT = {**COMMON, "messages": field(st.lists(message, min_size=1, max_size=4)), "logprobs": field(st.booleans()),
        "top_logprobs": field(small_int)}
COMPLETION = {**COMMON, "prompt": field(text | st.lists(text, min_size=1, max_size=3) | token_ids | st.lists(token_ids, max_size=3)),
              "echo": field(st.booleans()), "suffix": field(text), "best_of": field(small_int),
              "logprobs": field(small_int)}


@st.composite
def bodies(draw, fields: dict, required: str) -> dict:
    """The route's main field (most of the time), up to five other fields, now and then unknown
    keys: few enough fields that many bodies are valid and reach the engine."""
    body = {}
    if draw(st.integers(0, 9)):
        body[required] = draw(fields[required])
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[name] = draw(fields[name])
    if not draw(st.integers(0, 9)):
        body.update(draw(st.dictionaries(text, any_json, max_size=2)))
    return body


# ---- checks ----
def check(srv, path: str, content: bytes) -> None:
    r = httpx.post(srv.url + path, content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    SEEN[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert srv.worker.failure is None and httpx.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200
    if r.status_code >= 400:
        err = r.json()["error"]
        if os.environ.get("FUZZ_DEBUG"):
            MESSAGES[err["message"][:50]] += 1
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [x for x in r.text.splitlines() if x]
        assert lines[-1] == "data: [DONE]", r.text[-500:]
        events = [json.loads(x[6:]) for x in lines[:-1]]
        assert not [e for e in events if "error" in e], r.text[:500]
    else:
        assert r.json()["choices"], r.text


def dump(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@settings(max_examples=EXAMPLES or 100, **SETTINGS)
@given(body=bodies(CHAT, "messages"))
def test_fuzz_chat_bodies(srv, body):
    check(srv, "/v1/chat/completions", dump(body))


@settings(max_examples=EXAMPLES or 100, **SETTINGS)
@given(body=bodies(COMPLETION, "prompt"))
def test_fuzz_completion_bodies(srv, body):
    check(srv, "/v1/completions", dump(body))


def mutated(raw: bytes, cut: int, junk: bytes) -> bytes:
    """A valid body cut, spliced with junk bytes: broken UTF-8, truncated JSON, stray brackets."""
    i = cut % (len(raw) + 1)
    return raw[:i] + junk + raw[i + len(junk):]


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(mutated, st.sampled_from([b'{"prompt": "hello there", "max_tokens": 2}',
                                        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}']),
              st.integers(0, 80), st.binary(min_size=1, max_size=6) | st.sampled_from([b"[[[[", b"\\u", b"\\ud800", b"\xff"])))


@settings(max_examples=EXAMPLES or 60, **SETTINGS)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw=raw_bodies)
def test_fuzz_raw_bytes(srv, path, raw):
    check(srv, path, raw)
