"""The server as users start it: `mistralrs-server --port N --log ... gguf -m DIR -f FILE`, no
output mode at all (port 1234), the request log, and SIGINT/SIGTERM ending it with exit 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package ships with here
import pytest

import gguf_builder as gb
from test_server import TEMPLATE, free_port

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("server_cli")
    gb.write_gguf(d / "chat.gguf", gb.tiny_llama(0), gb.gguf_vocab(gb.train_tokenizer()), chat_template=TEMPLATE)
    return d


def _start(args: list[str], exe: str = "mistralrs") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(BIN / exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up")


def _stream_in_background(port: int, seen: list) -> threading.Thread:
    def run():
        req = {"prompt": "the quick", "max_tokens": 400, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=req, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        seen.append(line)
        except httpx.HTTPError as e:
            seen.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_cleanly_with_a_stream_in_flight(model_dir, tmp_path, sig):
    port, log = free_port(), tmp_path / "requests.jsonl"
    proc = _start(["--port", str(port), "--request-logging-file", str(log), "gguf", "-m", str(model_dir),
                   "-f", "chat.gguf"], exe="mistralrs-server")
    _wait_healthy(proc, port)
    seen: list = []
    t = _stream_in_background(port, seen)
    deadline = time.time() + 30
    while not seen and time.time() < deadline:
        time.sleep(0.05)
    assert seen, "no streamed token"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    t.join(30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert seen[-1] == "data: [DONE]"  # finished within the grace period, or ended by the server
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[0] == "request"


def test_no_output_mode_serves_on_1234(model_dir):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 1234)) == 0:
            pytest.skip("port 1234 is in use on this machine")
    proc = _start(["--log", "info", "gguf", "-f", str(model_dir / "chat.gguf")])
    try:
        _wait_healthy(proc, 1234)
        r = httpx.post("http://127.0.0.1:1234/v1/chat/completions",
                       json={"model": "whatever", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "http://127.0.0.1:1234" in err
    assert not Path("info").exists()  # --log info is a level, not a file


def test_two_output_modes_are_one_error(model_dir):
    p = subprocess.run([str(BIN / "mistralrs"), "--port", "8080", "--prompt", "hi", "gguf", "-f",
                        str(model_dir / "chat.gguf")], capture_output=True, text=True, timeout=120)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(err) == 1 and "--prompt" in err[0] and "--port" in err[0]
