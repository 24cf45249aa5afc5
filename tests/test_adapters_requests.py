"""Many LoRA adapters at once, chosen per request: the `adapters` field (server, openai client,
Python API), POST /activate_adapters, `\\adapter` in -i, and the bad input around them.

A tiny llama GGUF serves three random adapters (an AdapterBank of AdapterFactors). What is
checked against something independent: a request's text is transformers' greedy text of the base
model with that request's adapters merged into its weights by hand (W += scale * B @ A); six
requests with different adapter sets sent at once and run in one engine step give what each
gives alone (token for token and log-probability for log-probability; the torch path within the
noise test_engine_batch.py measures for it)."""
from __future__ import annotations

import copy
import json
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx2 as httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.adapters.bank import AdapterBank, AdapterFactors
from mistralrs_cli.adapters.torch_lora import install
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.api import Which
from mistralrs_cli.loaders.load import load
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, LoadOptions
from mistralrs_cli.validation import ParamError, ParamTypeError, check_adapters
from test_server import MSGS, TEMPLATE, serve

PROMPT = "seven wizards quietly hex jolly boxing frogs while the quick brown fox jumps over"
NAMES = ["a", "b", "c"]
# which modules each adapter adapts (of llama's seven linear targets), its rank and scale
SHAPES = {"a": (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 4, 2.0),
          "b": (("q_proj", "v_proj"), 2, 1.5), "c": (("gate_proj", "up_proj", "down_proj"), 3, 0.5)}
# none, the default, one, two, others: each its own text (checked)
SETS = [[], None, ["a"], ["b"], ["a", "b"], ["b", "c"]]
TOL = 1e-4  # the torch path's log-probabilities batched vs alone (test_engine_batch.py)
CONFIG = EngineConfig(block_size=8)  # small blocks: the prompts fill several, so the prefix cache is used


def random_adapters(hf, seed: int = 0) -> list[AdapterFactors]:
    """Random LoRA factors in HF layout on the tiny llama's modules."""
    rng = np.random.default_rng(seed)
    mods = dict(hf.named_modules())
    out = []
    for name, (targets, r, scale) in SHAPES.items():
        factors = {}
        for layer in range(hf.config.num_hidden_layers):
            for t in targets:
                part = "mlp" if t.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
                module = f"model.layers.{layer}.{part}.{t}"
                w = mods[module].weight
                factors[module] = (rng.normal(0, 0.3, (r, w.shape[1])).astype(np.float32),
                                   rng.normal(0, 0.3, (w.shape[0], r)).astype(np.float32))
        out.append(AdapterFactors(name, scale, factors))
    return out


def merged(hf, adapters: list[AdapterFactors], names: list[str]):
    """The reference: a copy of the transformers model with `names` merged (W += scale * B @ A)."""
    model = copy.deepcopy(hf)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for a in adapters:
            if a.name in names:
                for module, (A, B) in a.factors.items():
                    mods[module].weight += a.scale * torch.from_numpy(B @ A)
    return model


def attach(loaded, adapters: list[AdapterFactors], default: list[str]) -> None:
    """Serve `adapters` unmerged on whichever executor runs the model (as loaders/lora.py does)."""
    bank = AdapterBank(adapters, loaded.config.num_hidden_layers)
    loaded.adapters, loaded.default_adapters = bank, list(default)
    if hasattr(loaded.model, "named_modules"):
        install(loaded.model, bank)
    else:
        loaded.model.set_adapters(bank)


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def build(tmp_path_factory, qtype, numerics: str, default: list[str]) -> SimpleNamespace:
    tok = gb.train_tokenizer()
    hf = gb.tiny_llama(0)
    path = gb.write_gguf(tmp_path_factory.mktemp("adapters") / "tiny.gguf", hf, gb.gguf_vocab(tok), qtype=qtype,
                         chat_template=TEMPLATE)
    spec = Which.GGUF(None, str(path))
    loaded = load(spec, LoadOptions(token_source="none", numerics=numerics))
    loaded.generation_config = {"temperature": 0.0}  # absent fields: greedy
    adapters = random_adapters(hf)
    attach(loaded, adapters, default)
    return SimpleNamespace(hf=hf, loaded=loaded, spec=spec, path=path, adapters=adapters, default=default)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """F32 weights on the torch path (--numerics exact): transformers' text is the reference."""
    return build(tmp_path_factory, Q.F32, "exact", ["c"])


@pytest.fixture(scope="module")
def srv(tiny):
    with serve(tiny.loaded, tiny.spec, config=CONFIG) as s:
        yield s


def reference_text(tiny, names: list[str] | None, ids: list[int], n: int) -> str:
    names = tiny.default if names is None else names
    return tiny.loaded.tokenizer.decode(greedy_ids(merged(tiny.hf, tiny.adapters, names), ids, n))


def error_of(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


# ---- the rule (validation.py) ----
def test_check_adapters_rule():
    assert check_adapters(None, NAMES) is None
    assert check_adapters([], NAMES) == [] and check_adapters([], []) == []
    assert check_adapters(["b", "a", "b"], NAMES) == ["b", "a"]  # repeats dropped, order kept
    with pytest.raises(ParamTypeError, match=r"^adapters must be a list of adapter names \(strings\), got str 'a'\.$"):
        check_adapters("a", NAMES)
    with pytest.raises(ParamTypeError, match="got list"):
        check_adapters(["a", 3], NAMES)
    with pytest.raises(ParamError) as e:
        check_adapters(["a", "zz", "x" * 100], NAMES)
    assert str(e.value) == ("adapters names 'zz', '" + "x" * 40 + "'..., which this model does not serve; "
                            "its adapters are 'a', 'b', 'c'.") and e.value.field == "adapters"
    many = [f"n{i}" for i in range(10_000)]  # a long list costs one pass; the message stays short
    with pytest.raises(ParamError, match=r"'n4' and 9995 more, which") as e:
        check_adapters(many, NAMES)
    assert len(str(e.value)) < 200
    with pytest.raises(ParamError, match=r"^adapter_names names 'a', but this model was loaded without LoRA "
                                         r"adapters; drop adapter_names or load the model with its adapters\.$"):
        check_adapters(["a"], [], key="adapter_names")


# ---- the server ----
def test_request_adapters_through_the_openai_client(srv, tiny):
    """chat and completions, streamed and not: the text of the merged model, for each set."""
    ids = chat_ids(tiny.loaded, MSGS)
    texts = set()
    for names in (["a"], ["b", "c"], [], None):
        want = reference_text(tiny, names, ids, 6)
        texts.add(want)
        extra = {} if names is None else {"extra_body": {"adapters": names}}
        r = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, **extra)
        assert r.choices[0].message.content == want, names
        chunks = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, stream=True, **extra)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want, names
    assert len(texts) == 4  # each set changes the answer: the adapters really run
    pids = tiny.loaded.tokenizer.encode(PROMPT)
    want = reference_text(tiny, ["a", "b"], pids, 6)
    r = srv.client.completions.create(model="m", prompt=PROMPT, max_tokens=6, extra_body={"adapters": ["a", "b"]})
    assert r.choices[0].text == want
    parts = srv.client.completions.create(model="m", prompt=PROMPT, max_tokens=6, stream=True,
                                          extra_body={"adapters": ["a", "b"]})
    assert "".join(c.choices[0].text for c in parts if c.choices) == want


def test_json_schema_grammar_with_adapters(srv):
    """A response_format grammar and a request's adapters together: at temperature 1 each
    adapter set's output validates (jsonschema), and the sets still change the text."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"type": "string", "maxLength": 8}},
              "required": ["n", "tag"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    texts = set()
    for names in (["a"], ["b", "c"], []):
        r = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=60, temperature=1.0, seed=1,
                                               response_format=fmt, extra_body={"adapters": names})
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), schema)
        texts.add(c.message.content)
    assert len(texts) > 1


@contextmanager
def engine_held(worker):
    """The engine thread waits in a call until the block ends: requests sent meanwhile queue up
    and all start in the same step."""
    entered, go = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        go.wait(60)
    t = threading.Thread(target=worker.call, args=(hold,), daemon=True)
    t.start()
    assert entered.wait(30)
    try:
        yield
    finally:
        go.set()
        t.join(30)


def at_once(worker, calls: list) -> list:
    """Run `calls` (each sends one request) in threads so that their requests all start in the
    same engine step; their results, in order."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()
    with engine_held(worker):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while worker.pending < len(calls) and time.time() < deadline:
            time.sleep(0.01)
        assert worker.pending == len(calls)
    for t in threads:
        t.join(60)
    return results


@contextmanager
def steps_seen(model):
    """Every forward pass's adapter weights (n_layers, T, n_adapters) or None."""
    seen, step = [], model.step

    def spy(*args, **kw):
        seen.append(kw.get("adapter_weights"))
        return step(*args, **kw)
    model.step = spy
    try:
        yield seen
    finally:
        del model.step


def completion(client, names, n: int = 10):
    extra = {} if names is None else {"extra_body": {"adapters": names}}
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=n, logprobs=3, **extra)
    lp = r.choices[0].logprobs
    return r.choices[0].text, lp.tokens, lp.token_logprobs, lp.top_logprobs


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Q8_0 weights on the native runtime, whose rows are computed each on its own: batched and
    alone agree bit for bit."""
    t = build(tmp_path_factory, Q.Q8_0, "precise", ["c"])
    assert isinstance(t.loaded.model, NativeModel)
    with serve(t.loaded, t.spec, config=CONFIG) as s:
        yield t, s


@pytest.mark.parametrize("executor", ["torch-f32", "native-q8_0"])
def test_six_adapter_sets_at_once_give_what_each_gives_alone(executor, request):
    tiny, srv = (request.getfixturevalue("tiny"), request.getfixturevalue("srv")) if executor == "torch-f32" \
        else request.getfixturevalue("native")
    exact = executor.startswith("native")
    with steps_seen(tiny.loaded.model) as seen:
        results = at_once(srv.worker, [lambda names=names: completion(srv.client, names) for names in SETS])
    # one forward pass carried rows of all six sets: the default is c, so six distinct row patterns
    patterns = [len({tuple(w[:, t].ravel()) for t in range(w.shape[1])}) for w in seen if w is not None]
    assert max(patterns) == len(SETS)
    alone = [completion(srv.client, names) for names in SETS]  # one by one, prefix cache warm
    assert len({a[0] for a in alone}) == len(SETS)
    for names, got, want in zip(SETS, results, alone):
        if exact:  # token for token, every log-probability and top-3 alternative equal
            assert got == want, names
            continue
        assert got[1] == want[1], names
        assert np.allclose(got[2], want[2], atol=TOL, rtol=0), names
        assert want[0] == reference_text(tiny, names, tiny.loaded.tokenizer.encode(PROMPT), 10), names


def test_activate_adapters_sets_the_default_for_later_requests_only(srv, tiny):
    ids = chat_ids(tiny.loaded, MSGS)
    first = reference_text(tiny, ["c"], ids, 24)
    got = {}

    def activate():
        got["r"] = httpx.post(srv.url + "/activate_adapters", json={"adapter_names": ["b", "a"]}, timeout=30)
    try:
        # the engine takes the streamed request, then the activation, then runs 24 steps
        with engine_held(srv.worker):
            stream = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=24, stream=True)
            t = threading.Thread(target=activate)
            t.start()
            deadline = time.time() + 30
            while srv.worker._inbox.qsize() < 2 and time.time() < deadline:  # the request and the call
                time.sleep(0.01)
            assert srv.worker._inbox.qsize() == 2
        t.join(30)
        r = got["r"]
        assert r.status_code == 200 and r.json()["active_adapters"] == ["b", "a"]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == first
        later = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=6)
        assert later.choices[0].message.content == reference_text(tiny, ["a", "b"], ids, 6)
        r = httpx.post(srv.url + "/v1/activate_adapters", json={"adapter_names": []})
        assert r.status_code == 200 and r.json()["active_adapters"] == []
        base = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=6)
        assert base.choices[0].message.content == reference_text(tiny, [], ids, 6)
    finally:
        httpx.post(srv.url + "/activate_adapters", json={"adapter_names": tiny.default})


def test_unknown_adapters_are_a_400_naming_them_and_the_server_goes_on(srv):
    for call in (lambda: srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=2,
                                                            extra_body={"adapters": ["a", "nope", "zz"]}),
                 lambda: srv.client.completions.create(model="m", prompt="hi", max_tokens=2,
                                                       extra_body={"adapters": ["nope", "zz"]})):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert error_of(e.value) == {"message": "adapters names 'nope', 'zz', which this model does not serve; "
                                                "its adapters are 'a', 'b', 'c'.",
                                     "type": "invalid_request_error", "param": "adapters", "code": None}
    for body, says in (({"adapter_names": ["x"]}, "adapter_names names 'x', which this model does not serve"),
                       ({"adapter_names": "a"}, "adapter_names must be a list of adapter names (strings), got str"),
                       ({}, 'send the adapters to activate as adapter_names, e.g. {"adapter_names": ["a"]}')):
        r = httpx.post(srv.url + "/activate_adapters", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(says), r.text
        assert r.json()["error"]["param"] == "adapter_names"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "adapters": {"a": 1}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("adapters must be a list")
    ok = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=2, extra_body={"adapters": ["a"]})
    assert ok.choices[0].finish_reason == "length"
