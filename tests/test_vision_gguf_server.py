"""The server as users start it with a GGUF language model under the vision part:
`mistralrs-server --port N vision-plain -m DIR -f text.gguf` (a subprocess), LLaVA and Gemma 3 with
F32 GGUF text halves that gguf-py's GGUFWriter wrote from the checkpoint's own text model. An
image_url part (data: URI) through the official openai client answers transformers' greedy text on
the same checkpoint (plain and streamed); bytes that are not an image are a 400 in OpenAI's error
shape, and the server keeps serving."""
from __future__ import annotations

import subprocess
from pathlib import Path

import openai
import pytest
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

import gguf_builder as gb
import vision_models as vm
from test_server import free_port
from test_server_cli import _start as start_cli, _wait_healthy as wait_healthy
from test_vision_gguf import ARCHS, text_model

STEPS = 8


def _start(path: Path, gguf_name: str, port: int) -> subprocess.Popen:
    return start_cli(["--port", str(port), "vision-plain", "-m", str(path), "-f", gguf_name], "mistralrs-server")


@pytest.fixture(scope="module", params=sorted(ARCHS))
def server(request, tmp_path_factory):
    """(client, transformers' greedy text for the 'tall' image, the server process) per architecture."""
    make, save, processor = ARCHS[request.param]
    hf = make()
    path = tmp_path_factory.mktemp(f"{request.param}_server")
    save(hf, path)
    gb.write_gguf(path / "text-f32.gguf", text_model(hf), vocab=None, qtype=Q.F32)
    ids = vm.hf_greedy(hf, processor(path), vm.TEXT, [vm.odd_images()["tall"]], STEPS)
    want = Tokenizer.from_file(str(path / "tokenizer.json")).decode(ids)  # the checkpoint's tokenizer
    port = free_port()
    proc = _start(path, "text-f32.gguf", port)  # a file name inside -m, as the CLI takes it
    try:
        wait_healthy(proc, port, timeout=180)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        yield client, want, proc
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _chat(client, url: str, **kw):
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": vm.TEXT}]
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": parts}],
                                          max_tokens=STEPS, temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_image_chat_greedy_equals_transformers(server):
    client, want, _ = server
    r = _chat(client, vm.uri("tall"))
    assert r.usage.completion_tokens == STEPS
    assert r.choices[0].message.content == want
    stream = _chat(client, vm.uri("tall"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_bytes_that_are_not_an_image_are_a_400_and_the_server_keeps_serving(server):
    client, want, proc = server
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "data:image/png;base64,aGVsbG8sIG5vdCBhbiBpbWFnZQ==")  # "hello, not an image"
    assert e.value.status_code == 400
    err = e.value.body  # OpenAI's shape: {"error": {message, type, param, code}}, the client unwraps it
    assert err["type"] == "invalid_request_error" and err["param"] == "messages", err
    assert "not an image Pillow can read" in err["message"], err
    assert proc.poll() is None
    assert _chat(client, vm.uri("tall")).choices[0].message.content == want
