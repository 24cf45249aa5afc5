"""The OpenAI server on a tiny llama, through the official `openai` client and raw HTTP.

Greedy text and logprobs are checked against the transformers model the GGUF was written from;
JSON and SSE shapes are asserted field by field (the client validates almost nothing)."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx2 as httpx  # the HTTP client the openai package ships with here
import openai
import pytest
import torch
import uvicorn

import gguf_builder as gb
from mistralrs_cli.api import Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.worker import EngineThread
from mistralrs_cli.outputs.request_log import RequestLog
from mistralrs_cli.outputs.server import reisq_handler
from mistralrs_cli.outputs.server.app import ServerState, make_app
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, GGUFSpec

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MSGS = [{"role": "user", "content": "the quick brown fox"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(loaded, spec=None, api_key=None, config: EngineConfig | None = None, log: RequestLog | None = None):
    """The app on a free port in a thread of this process (so tests can look at the engine)."""
    worker = EngineThread(Engine(loaded, config or EngineConfig()))
    state = ServerState(worker, loaded, api_key, log or RequestLog(None), reisq_handler(spec, worker) if spec else None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(url=url, worker=worker, state=state,
                              client=openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0))
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop(timeout=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = gb.train_tokenizer()
    hf = gb.tiny_llama(0)
    path = gb.write_gguf(tmp_path_factory.mktemp("server") / "tiny.gguf", hf, gb.gguf_vocab(tok), chat_template=TEMPLATE)
    runner = Runner(Which.GGUF(None, str(path)), numerics="exact")  # no llama.cpp f16 rounding
    # as a generation_config.json saying temperature 0: absent fields are greedy, so the text is
    # transformers' greedy continuation (the chat defaults are tested in test_defaults_end.py)
    runner.loaded.generation_config = {"temperature": 0.0}
    return SimpleNamespace(hf=hf, loaded=runner.loaded, spec=GGUFSpec(str(path)), path=path)


@pytest.fixture(scope="module")
def srv(tiny):
    with serve(tiny.loaded, tiny.spec) as s:
        yield s


def reference(tiny, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation and the log-softmax at each generated position."""
    ids, lps = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = tiny.hf(torch.tensor([ids])).logits[0, -1].float()
            lps.append(torch.log_softmax(logits, -1))
            ids.append(int(logits.argmax()))
    return ids[-n:], lps


def ref_text(tiny, ids: list[int], n: int) -> str:
    return tiny.loaded.tokenizer.decode(reference(tiny, ids, n)[0])


def sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the openai client ----
def test_models_and_health(srv, tiny):
    assert [m.id for m in srv.client.models.list().data] == [tiny.loaded.model_id]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    body = httpx.get(srv.url + "/v1/models").json()
    assert body["object"] == "list" and set(body["data"][0]) == {"id", "object", "created", "owned_by"}


def test_chat_streamed_and_not_equal_transformers(srv, tiny):
    want = ref_text(tiny, chat_ids(tiny.loaded, MSGS), 8)
    r = srv.client.chat.completions.create(model="anything", messages=MSGS, max_tokens=8)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(chat_ids(tiny.loaded, MSGS))
    chunks = list(srv.client.chat.completions.create(model="x", messages=MSGS, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens and not chunks[-1].choices


def test_completions_streamed_and_not(srv, tiny):
    prompt = "rain falls in"
    want = ref_text(tiny, tiny.loaded.tokenizer.encode(prompt), 6)
    r = srv.client.completions.create(model="m", prompt=prompt, max_tokens=6)
    assert r.choices[0].text == want and r.object == "text_completion" and r.id.startswith("cmpl-")
    parts = [c.choices[0].text for c in srv.client.completions.create(model="m", prompt=prompt, max_tokens=6,
                                                                      stream=True) if c.choices]
    assert "".join(parts) == want
    echo = srv.client.completions.create(model="m", prompt=prompt, max_tokens=6, echo=True)
    assert echo.choices[0].text == prompt + want


def test_n_seed_stop_and_max_tokens_1(srv, tiny):
    kw = dict(model="m", messages=MSGS, max_tokens=10, temperature=1.0, seed=42, n=2)
    a, b = srv.client.chat.completions.create(**kw), srv.client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i draws with seed + i
    assert a.usage.completion_tokens == 20
    other = srv.client.chat.completions.create(**{**kw, "seed": 43})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]
    greedy = ref_text(tiny, chat_ids(tiny.loaded, MSGS), 8)
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    r = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, stop=[stop])
    assert r.choices[0].message.content == greedy[: greedy.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = [c for c in srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=8, stop=stop,
                                                             stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy[: greedy.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    one = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_logprobs_are_transformers_log_softmax(srv, tiny):
    ids = chat_ids(tiny.loaded, MSGS)
    toks, lps = reference(tiny, ids, 5)
    tt = tiny.loaded.tokenizer
    r = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry, tok, lp in zip(content, toks, lps):
        assert entry.logprob <= 0 and abs(entry.logprob - float(lp[tok])) < 1e-4
        assert bytes(entry.bytes) == tt.decode([tok]).encode() or entry.token == "\ufffd"
        top_ids = torch.topk(lp, 3).indices.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([float(lp[i]) for i in top_ids], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 3
    chunks = [c for c in srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=5, logprobs=True,
                                                             top_logprobs=3, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    c = srv.client.completions.create(model="m", prompt="rain falls in", max_tokens=3, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == c.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)


# ---- raw shapes ----
def test_raw_json_shapes(srv):
    body = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}).json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    ch = body["choices"][0]
    assert set(ch) == {"index", "message", "logprobs", "finish_reason"} and ch["logprobs"] is None
    assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] == 2
    body = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()
    assert set(body["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}


def test_raw_sse_shapes(srv):
    req = {"messages": MSGS, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=req) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c for c in chunks[1:-2]]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["usage"] is None for c in tokens)
    assert len(tokens) <= 4  # one chunk per token, never batched
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and all("usage" not in c for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# ---- bad requests ----
BAD = {
    "malformed-json": ("/v1/chat/completions", b'{"messages": [', None),
    "not-an-object": ("/v1/chat/completions", b"[1, 2]", None),
    "messages-wrong-type": ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    "empty-messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "max-tokens-string": ("/v1/chat/completions", {"messages": MSGS, "max_tokens": "ten"}, "max_tokens"),
    "negative-max-tokens": ("/v1/chat/completions", {"messages": MSGS, "max_tokens": -1}, "max_tokens"),
    "huge-max-tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
    "n-0": ("/v1/chat/completions", {"messages": MSGS, "n": 0}, "n"),
    "temperature-negative": ("/v1/chat/completions", {"messages": MSGS, "temperature": -0.5}, "temperature"),
    "top-p-above-1": ("/v1/chat/completions", {"messages": MSGS, "top_p": 1.5}, "top_p"),
    "logit-bias-outside-vocab": ("/v1/chat/completions", {"messages": MSGS, "logit_bias": {"99999": 5}}, "logit_bias"),
    "stream-not-bool": ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    "prompt-missing": ("/v1/completions", {"max_tokens": 3}, "prompt"),
    "prompt-too-long": ("/v1/completions", {"prompt": "hello world " * 400}, "prompt"),
    "image-part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_is_a_400_and_the_server_keeps_serving(srv, name):
    path, body, param = BAD[name]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(srv.url + path, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    if name == "prompt-too-long":
        assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200


def test_unknown_route_and_re_isq_on_gguf(srv):
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    for path in ("/v1/re_isq", "/re_isq"):
        r = httpx.post(srv.url + path, json={"ggml_type": "Q4K"})
        assert r.status_code == 400 and "GGUF" in r.json()["error"]["message"]


def test_api_key(tiny):
    with serve(tiny.loaded, api_key="sekrit") as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=MSGS, max_tokens=1)
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.client.chat.completions.create(model="m", messages=MSGS, max_tokens=1).choices
        assert httpx.get(s.url + "/health").status_code == 200


def _clients_then_idle(srv, client, n: int) -> None:
    """Run n client threads to their end, then wait (up to 30 s) until the engine has no requests."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = time.time() + 30
    while srv.worker.pending and time.time() < deadline:
        time.sleep(0.1)


def test_clients_hanging_up_mid_stream_free_every_block(srv):
    def hang_up(i: int) -> None:
        req = {"prompt": f"the quick brown fox {i}", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=req, timeout=60) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 4:
                    break  # leave with the stream still running

    cancelled = srv.worker.call(lambda e: e.finished.get("cancelled", 0))
    _clients_then_idle(srv, hang_up, 50)
    assert srv.worker.pending == 0
    assert srv.worker.call(lambda e: (e.has_unfinished(), e.kv.alloc.held_by_sequences())) == (False, 0)
    assert srv.worker.call(lambda e: e.finished.get("cancelled", 0)) - cancelled == 50
    r = srv.client.completions.create(model="m", prompt="hi", max_tokens=3)
    assert r.choices[0].finish_reason == "length"


def test_re_isq_quantizes_a_plain_model_in_place(tiny, tmp_path):
    from mistralrs_cli.quant.qweight import QLinear
    from mistralrs_cli.types import PlainSpec

    tiny.hf.save_pretrained(tmp_path)
    gb.train_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loaded = Runner(Which.Plain(str(tmp_path))).loaded
    loaded.generation_config = {"temperature": 0.0}  # greedy: compared with transformers' text
    with serve(loaded, PlainSpec(str(tmp_path))) as s:
        before = s.client.completions.create(model="m", prompt="rain falls in", max_tokens=4).choices[0].text
        assert before == ref_text(tiny, loaded.tokenizer.encode("rain falls in"), 4)
        bad = httpx.post(s.url + "/re_isq", json={"isq_type": "Q9_Z"})
        assert bad.status_code == 400 and "Q9_Z" in bad.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/re_isq", json={"ggml_type": "Q8_0"}, timeout=120)
        assert r.status_code == 200, r.text
        assert any(isinstance(m, QLinear) for m in loaded.model.modules())
        after = s.client.completions.create(model="m", prompt="rain falls in", max_tokens=4)
        assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 4


def test_a_full_queue_is_a_503(srv):
    srv.worker.max_pending = 0
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    finally:
        srv.worker.max_pending = 1024
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_non_streaming_clients_that_time_out_are_cancelled(srv):
    cancelled = srv.worker.call(lambda e: e.finished.get("cancelled", 0))

    def give_up(i: int) -> None:
        req = {"prompt": f"a lazy dog {i}", "max_tokens": 500, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=req, timeout=0.3)

    _clients_then_idle(srv, give_up, 10)
    assert srv.worker.call(lambda e: e.finished.get("cancelled", 0)) > cancelled  # noticed, not run to the end
    assert srv.worker.call(lambda e: e.kv.alloc.held_by_sequences()) == 0
