"""The server against hostile requests: none of them stops it, stalls other clients or gets a
plain-text 500. Every case ends with the server answering /health truthfully and a normal request
with transformers' greedy text. Hangs are bounded by client timeouts, so a regression fails."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest

import gguf_builder as gb
from mistralrs_cli.outputs.request_log import RequestLog
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.validation import Limits
from test_server import MSGS, TEMPLATE, free_port, ref_text, serve, tiny  # noqa: F401 - tiny: a fixture
from test_engine_faults import POISON_SEED, poison_the_sampler
from test_server_cli import _start, _wait_healthy
HEALTH_BOUND = 5.0  # seconds /health may take while another client is hostile (it took 45 s before)


@pytest.fixture(scope="module")
def srv(tiny):  # noqa: F811
    with serve(tiny.loaded, tiny.spec) as s:
        yield s


def is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def still_serving(s, tiny) -> None:  # noqa: F811
    assert httpx.get(s.url + "/health", timeout=10).json() == {"status": "ok"}
    r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref_text(tiny, chat_ids(tiny.loaded, MSGS), 4)
    assert s.worker.call(lambda e: (e.has_unfinished(), e.kv.alloc.held_by_sequences())) == (False, 0)


# ---- the engine thread ----
def test_seed_minus_one_then_a_normal_request(srv, tiny):  # noqa: F811
    """The issue's report: this request killed the engine thread and every later one hung."""
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "seed": -1}, timeout=30)
    assert is_openai_error(r, 400)["param"] == "seed"
    still_serving(srv, tiny)


def _chat(s, results: list, i: int, seed: int | None, stream: bool = False) -> None:
    body = {"messages": [{"role": "user", "content": f"tell me {i}"}], "max_tokens": 5, "ignore_eos": True,
            "seed": seed, "stream": stream}
    results[i] = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_a_fault_in_one_request_fails_it_alone(srv, tiny, monkeypatch, stream):  # noqa: F811
    """Sampling raises for one of four concurrent requests (a fault no validation can catch): it
    gets a 500 in OpenAI's shape (a streamed one an error event), the others transformers' text."""
    poison_the_sampler(monkeypatch)
    results: list = [None] * 4
    threads = [threading.Thread(target=_chat, args=(srv, results, i, POISON_SEED if i == 1 else None, stream))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for i, r in enumerate(results):
        want = ref_text(tiny, chat_ids(tiny.loaded, [{"role": "user", "content": f"tell me {i}"}]), 5)
        if stream:
            events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
            errors = [e["error"] for e in events if "error" in e]
            assert (errors and "injected" in errors[0]["message"]) if i == 1 else (text == want and not errors)
        elif i == 1:
            err = is_openai_error(r, 500)
            assert err["type"] == "server_error" and "injected" in err["message"]
        else:
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    monkeypatch.undo()
    still_serving(srv, tiny)


def test_a_failed_engine_says_so_and_refuses_at_once(tiny):  # noqa: F811
    """A fault no request caused: the request in flight gets a 503, /health a 503 with the reason,
    and later requests a 503 at once (before, they hung while /health said ok)."""
    with serve(tiny.loaded) as s:
        s.worker.call(lambda e: setattr(e.scheduler, "schedule", lambda: 1 / 0))
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3}, timeout=30)
        assert is_openai_error(r, 503)["code"] == "engine_failed"
        h = httpx.get(s.url + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert "ZeroDivisionError" in h.json()["error"]["message"]
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert is_openai_error(r, 503)["code"] == "engine_failed" and time.monotonic() - t0 < 5


# ---- bodies ----
def _health_while(s, work) -> tuple[object, list[float]]:
    """Run work() in a thread and time /health every 0.2 s until it returns."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", work()))
    t.start()
    times = []
    while t.is_alive():
        t0 = time.monotonic()
        assert httpx.get(s.url + "/health", timeout=HEALTH_BOUND * 5).status_code == 200
        times.append(time.monotonic() - t0)
        time.sleep(0.2)
    t.join()
    return box.get("r"), times


def test_a_60mb_body_is_a_413_while_health_answers(srv, tiny):  # noqa: F811
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (60 << 20)}]}).encode()
    r, times = _health_while(srv, lambda: httpx.post(
        srv.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"},
        timeout=60))
    err = is_openai_error(r, 413)
    assert "--max-body-bytes" in err["message"] and str(Limits().max_body_bytes) in err["message"]
    assert max(times, default=0) < HEALTH_BOUND
    still_serving(srv, tiny)


def test_a_chunked_body_is_cut_off_at_the_limit(srv, tiny):  # noqa: F811
    """No Content-Length to refuse early: the body is counted as it arrives."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * (1 << 20)
        yield b'"}'
    r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=60)
    assert "--max-body-bytes" in is_openai_error(r, 413)["message"]
    still_serving(srv, tiny)


def _nested(depth: int) -> bytes:
    """{"prompt": "hi", "max_tokens": 1, "x": [[...]]}: `depth` levels with the outer object."""
    return b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_deep_json_is_a_400_naming_the_limit(srv, tiny):  # noqa: F811
    limit = Limits().max_json_depth
    ok = httpx.post(srv.url + "/v1/completions", content=_nested(limit), timeout=30)
    assert ok.status_code == 200, ok.text
    for depth in (limit + 1, 100_000):
        r = httpx.post(srv.url + "/v1/completions", content=_nested(depth), timeout=30)
        assert f"--max-json-depth ({limit})" in is_openai_error(r, 400)["message"]
    # brackets inside strings are text, not nesting
    text = json.dumps({"prompt": "[" * 100 + "\\\\\"{" * 30, "max_tokens": 1}).encode()
    assert httpx.post(srv.url + "/v1/completions", content=text, timeout=30).status_code == 200
    still_serving(srv, tiny)


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": -Infinity}',
                                 b'{"prompt": "caf\xe9"}', b'{"prompt": "\\ud800 lone"}', b'{"prompt": "hi",',
                                 b"[1, 2]", b""])
def test_bodies_that_are_not_json_objects_are_400s(srv, tiny, raw):  # noqa: F811
    r = httpx.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    is_openai_error(r, 400)


def test_a_slow_template_renders_off_the_event_loop(tiny, monkeypatch):  # noqa: F811
    """A template that takes seconds to render delays its own request only (the render budget is
    raised so that it runs long enough to be seen)."""
    monkeypatch.setenv("MISTRALRS_TEMPLATE_ITERATIONS", str(10**9))
    monkeypatch.setenv("MISTRALRS_TEMPLATE_SECONDS", "60")
    loaded = copy.copy(tiny.loaded)
    slow = "{% for i in range(100000) %}{% for j in range(30) %}{% endfor %}{% endfor %}"
    loaded.chat_template = type(tiny.loaded.chat_template)(slow + "{{ messages[0]['content'] }}", "a test")
    with serve(loaded) as s:
        t0 = time.monotonic()
        r, times = _health_while(s, lambda: httpx.post(
            s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1}, timeout=120))
        took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    # rendered on the loop, a /health sent during the render would wait for most of it
    assert len(times) >= 3 and max(times) < min(HEALTH_BOUND, took / 2), (took, times)


# ---- the request log ----
def test_a_request_log_on_a_full_disk_is_reported_once_and_switched_off(tiny, capfd):  # noqa: F811
    """/dev/full opens fine and fails every write with ENOSPC, as a full disk does."""
    with serve(tiny.loaded, log=RequestLog("/dev/full")) as s:
        for _ in range(3):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        is_openai_error(httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "top_p": 7}), 400)
        still_serving(s, tiny)
        assert s.state.log.path is None
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "request log" in line]
    assert len(warnings) == 1 and "/dev/full" in warnings[0] and "No space left" in warnings[0], err


# ---- the process: SIGTERM, and a failed engine's exit ----
FOREVER = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
           "{{ messages[0]['content'] }}")
# the server as `mistralrs-server` runs it, its scheduler broken by a prompt ending in token argv[1]
BROKEN = """
import sys
from mistralrs_cli.engine import scheduler
real, poison = scheduler.Scheduler.schedule, int(sys.argv[1])
def schedule(self):
    if any(r.prompt_ids[-1:] == [poison] for r in self.waiting):
        raise ZeroDivisionError("injected scheduler fault")
    return real(self)
scheduler.Scheduler.schedule = schedule
from mistralrs_cli.cli import main
sys.argv = ["mistralrs-server", *sys.argv[2:]]
main()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_cli")
    tok = gb.train_tokenizer()
    gb.write_gguf(d / "chat.gguf", gb.tiny_llama(0), gb.gguf_vocab(tok), chat_template=TEMPLATE)
    gb.write_gguf(d / "forever.gguf", gb.tiny_llama(0), gb.gguf_vocab(tok), chat_template=FOREVER)
    return d


def _post_in_background(port: int, path: str, body: dict) -> list:
    box: list = []

    def run():
        try:
            box.append(httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=90))
        except httpx.HTTPError as e:
            box.append(e)
    threading.Thread(target=run, daemon=True).start()
    return box


@pytest.mark.parametrize("case", ["rendering", "generating"])
def test_sigterm_stops_the_server_while_it_renders_or_generates(model_dir, case, monkeypatch):
    """A template that never finishes (its render budget lifted) or a long generation in flight:
    SIGTERM still ends the process, with status 0, within a bound."""
    monkeypatch.setenv("MISTRALRS_TEMPLATE_ITERATIONS", str(10**15))
    monkeypatch.setenv("MISTRALRS_TEMPLATE_SECONDS", "100000")
    port = free_port()
    gguf = "forever.gguf" if case == "rendering" else "chat.gguf"
    proc = _start(["--port", str(port), "gguf", "-m", str(model_dir), "-f", gguf], exe="mistralrs-server")
    try:
        _wait_healthy(proc, port)
        if case == "rendering":
            _post_in_background(port, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 1})
        else:
            _post_in_background(port, "/v1/completions", {"prompt": "hi", "max_tokens": 500, "ignore_eos": True})
        time.sleep(1.0)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=HEALTH_BOUND).status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=45)  # GRACE_SECONDS (10) + uvicorn's 5 more, with room to spare
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_a_failed_engine_exits_non_zero_after_answering(model_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    poison = 499  # a prompt of token ids ending with it breaks the scheduler
    assert gb.train_tokenizer().encode("hi").ids[-1] != poison
    proc = subprocess.Popen([sys.executable, "-c", BROKEN, str(poison), "--port", str(port), "gguf", "-m",
                             str(model_dir), "-f", "chat.gguf"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(proc, port)
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200, ok.text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": [7, poison], "max_tokens": 2},
                       timeout=30)
        assert is_openai_error(r, 503)["code"] == "engine_failed"
        h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=HEALTH_BOUND)
        assert h.status_code == 503 and "injected scheduler fault" in h.json()["error"]["message"]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "error: the engine failed (ZeroDivisionError: injected scheduler fault); the server stopped." in err
