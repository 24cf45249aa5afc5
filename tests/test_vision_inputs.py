"""vision-plain from every surface a user has: --image with --prompt, the Python API's image
parts, the server's image_url parts through the official openai client (data: URIs, and an
http URL on 127.0.0.1 with --allow-local-images): greedy text equal to transformers' generate
with its own LlavaProcessor. Bad input is one 400 (or one CLI error line) and the server keeps
serving; the prefix cache keys image rows by the image's bytes; images batch with text."""
from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

import vision_models as vm
from test_server import serve
from mistralrs_cli import ChatCompletionRequest, Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import EngineConfig, LoadOptions, PlainSpec, SamplingParams, VisionSpec
from mistralrs_cli.vision.chat import chat_with_images

STEPS = 8
TEXT = "the quick brown fox"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_inputs")
    hf = vm.tiny_llava(1)
    vm.save_llava(hf, path)
    imgs = vm.odd_images()
    for name, data in imgs.items():
        (path / f"{name}.img").write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none"))
    return path, hf, vm.hf_llava_processor(path), imgs, loaded


def _want(ckpt, names: list[str], text: str = TEXT) -> str:
    path, hf, proc, imgs, loaded = ckpt
    return loaded.tokenizer.decode(vm.hf_greedy(hf, proc, text, [imgs[n] for n in names], STEPS))


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _parts(uris: list[str], text: str = TEXT) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": u}} for u in uris] + [{"type": "text", "text": text}]


def test_cli_image_flag(ckpt):
    path = ckpt[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([str(BIN / "mistralrs"), "--temperature", "0", "--ignore-eos", "--max-tokens", str(STEPS),
                          "--image", str(path / "tall.img"), "--image", str(path / "gray.img"), "--prompt", TEXT,
                          "vision-plain", "-m", str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _want(ckpt, ["tall", "gray"]) + "\n"


def test_cli_image_flag_tensor_parallel(ckpt):
    """--tp 2 (two gloo ranks on this host, the torch executor): the image prompt's greedy text is
    still transformers'."""
    path = ckpt[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([str(BIN / "mistralrs"), "--tp", "2", "--temperature", "0", "--ignore-eos", "--max-tokens",
                          str(STEPS), "--image", str(path / "tall.img"), "--prompt", TEXT, "vision-plain", "-m", str(path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _want(ckpt, ["tall"]) + "\n"


def test_python_api_image_parts(ckpt):
    path = ckpt[0]
    runner = Runner(Which.VisionPlain(str(path), arch="llava"), token_source="none", loaded=ckpt[4])
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": _parts([str(path / "wide.img")])}],
        max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    assert res.choices[0].message.content == _want(ckpt, ["wide"])


@pytest.fixture(scope="module")
def srv(ckpt):
    with serve(ckpt[4]) as s:
        yield s


def _chat(srv, content, **kw):
    return srv.client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                              max_tokens=STEPS, temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_server_data_uris_openai_client(srv, ckpt):
    imgs = ckpt[3]
    r = _chat(srv, _parts([_data_uri(imgs["rgba"])]))
    assert r.choices[0].message.content == _want(ckpt, ["rgba"])
    r = _chat(srv, _parts([_data_uri(imgs["tiny"]), _data_uri(imgs["wide"])]))
    assert r.choices[0].message.content == _want(ckpt, ["tiny", "wide"])
    stream = _chat(srv, _parts([_data_uri(imgs["rgba"])]), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == _want(ckpt, ["rgba"])


def _bomb() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG")  # 1e8 pixels in ~100 kB
    return buf.getvalue()


@pytest.fixture(scope="module")
def local_url(ckpt):
    """An http server on 127.0.0.1 serving the checkpoint's images."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ckpt[0]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


BAD = {
    "not an image": (lambda u: _data_uri(b"hello, not an image"), "not an image Pillow can read"),
    "bomb": (lambda u: _data_uri(_bomb()), "decompression bomb"),
    "file scheme": (lambda u: "file:///etc/passwd", "scheme file: is not accepted"),
    "ftp scheme": (lambda u: "ftp://example.com/cat.png", "scheme ftp: is not accepted"),
    "local path": (lambda u: "/etc/passwd", "a local path is not accepted"),
    "loopback url": (lambda u: u + "/tall.img", "--allow-local-images"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_images_are_400_and_the_server_keeps_serving(srv, ckpt, local_url, name):
    make, words = BAD[name]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(srv, _parts([make(local_url)]))
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "messages" and words in err["message"], err
    assert _chat(srv, _parts([_data_uri(ckpt[3]["tall"])])).choices[0].message.content == _want(ckpt, ["tall"])


def test_allow_local_images_fetches_from_127_0_0_1(srv, ckpt, local_url):
    vision = ckpt[4].vision
    vision.allow_local_images = True
    try:
        r = _chat(srv, _parts([local_url + "/gray.img"]))
    finally:
        vision.allow_local_images = False
    assert r.choices[0].message.content == _want(ckpt, ["gray"])


def test_images_to_a_text_only_model_are_400(ckpt):
    text_only = load(PlainSpec(str(ckpt[0]), "llama"), LoadOptions(token_source="none"))
    with serve(text_only) as s:
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            _chat(s, _parts([_data_uri(ckpt[3]["tall"])]))
        assert s.client.chat.completions.create(model="x", messages=[{"role": "user", "content": TEXT}],
                                                max_tokens=2).choices[0].message.content is not None


def test_cli_missing_placeholder_is_one_error_line(ckpt):
    path = ckpt[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(BIN / "mistralrs"), "--raw", "--image", str(path / "tall.img"), "--prompt", TEXT,
                          "vision-plain", "-m", str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --image: the prompt has 0 image placeholder")


# ---- the engine ----
def _prompt(loaded, names: list[str], text: str = TEXT):
    uris = [_data_uri(vm.odd_images()[n]) for n in names]
    return chat_with_images(loaded, [{"role": "user", "content": _parts(uris, text)}], allow_paths=False)


def _run(engine: Engine, ids, images) -> list[int]:
    params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
    return [o.token_id for o in engine.generate(ids, params, images=images) if o.token_id is not None]


def test_prefix_cache_keys_image_rows_by_the_image(ckpt):
    """Same text, two images: the prompts' token ids are equal, so only the images' hashes keep
    the second from reusing the first's cached blocks (without them it answers as the first)."""
    loaded = ckpt[4]
    alone = {n: _run(Engine(loaded, EngineConfig(block_size=8)), *_prompt(loaded, [n])) for n in ("tall", "wide")}
    assert alone["tall"] != alone["wide"]  # else the test could not tell
    engine = Engine(loaded, EngineConfig(block_size=8))
    assert _run(engine, *_prompt(loaded, ["tall"])) == alone["tall"]
    hits = engine.kv.alloc.hits
    assert _run(engine, *_prompt(loaded, ["wide"])) == alone["wide"]
    assert engine.kv.alloc.hits == hits
    assert _run(engine, *_prompt(loaded, ["tall"])) == alone["tall"]
    assert engine.kv.alloc.hits > hits  # the repeated image + prompt hit the cache


def test_six_requests_mixing_images_and_text_batch_as_alone(ckpt):
    loaded = ckpt[4]
    cases = [["tall"], [], ["rgba", "tiny"], ["gray"], [], ["wide"]]
    prompts = [_prompt(loaded, names, f"{TEXT} {i}") for i, names in enumerate(cases)]
    alone = [_run(Engine(loaded, EngineConfig(prefix_cache_n=0)), *p) for p in prompts]
    engine = Engine(loaded, EngineConfig(max_batch_tokens=64, prefix_cache_n=0))
    params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
    reqs = [engine.add_request(ids, params, images=images) for ids, images in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in reqs] == alone


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(BIN / "mistralrs"), "--temperature", "0", "--ignore-eos", "--max-tokens", str(STEPS),
                           *args], env=env, input=stdin, capture_output=True, text=True, timeout=300)


def test_interactive_image_command(ckpt):
    """\\image PATH text in -i; a bad image is one error line and the chat goes on."""
    path = ckpt[0]
    out = _cli("-i", "vision-plain", "-m", str(path),
               stdin=f"\\image {path / 'not-there.png'} hi\n\\image {path / 'tall.img'} {TEXT}\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == _want(ckpt, ["tall"])
    assert "error: \\image: cannot read the image file" in out.stderr


def test_interactive_image_path_with_spaces(ckpt, tmp_path):
    """A dropped file's path as terminals paste it: quoted, or with its spaces escaped."""
    from mistralrs_cli.outputs.interactive import _image_ref

    spaced = tmp_path / "my tall image.img"
    spaced.write_bytes((ckpt[0] / "tall.img").read_bytes())
    for typed in (f'"{spaced}"', f"'{spaced}'", str(spaced).replace(" ", "\\ ")):
        assert _image_ref(f"{typed} {TEXT}") == (str(spaced), TEXT)
    assert _image_ref("cat.png What's this?") == ("cat.png", "What's this?")
    out = _cli("-i", "vision-plain", "-m", str(ckpt[0]), stdin=f'\\image "{spaced}" {TEXT}\n')
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == _want(ckpt, ["tall"])


def test_cli_allow_local_images(ckpt, local_url):
    args = ("--image", local_url + "/wide.img", "--prompt", TEXT, "vision-plain", "-m", str(ckpt[0]))
    refused = _cli(*args)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--allow-local-images" in refused.stderr and "Traceback" not in refused.stderr
    allowed = _cli("--allow-local-images", *args)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == _want(ckpt, ["wide"]) + "\n"


def test_image_flag_without_prompt_is_one_error_line(ckpt):
    out = _cli("--image", str(ckpt[0] / "tall.img"), "-i", "vision-plain", "-m", str(ckpt[0]))
    assert out.returncode != 0 and out.stderr.strip() == (
        "error: --image goes with --prompt; in -i type \\image PATH_OR_URL text, and the server takes image_url parts.")


def test_vision_architecture_enum_and_grammar_with_images(ckpt):
    """mistral.rs's Which.VisionPlain(arch=VisionArchitecture.LLaVA); a grammar constrains an
    answer about an image as it does text (the image path feeds the same sampler)."""
    from mistralrs_cli import VisionArchitecture

    runner = Runner(Which.VisionPlain(str(ckpt[0]), arch=VisionArchitecture.LLaVA), token_source="none")
    assert runner.loaded.vision.arch == "llava"
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": _parts([str(ckpt[0] / "tall.img")])}],
        max_tokens=6, temperature=0.0, grammar={"type": "regex", "value": "[0-9]{3}"}))
    assert len(res.choices[0].message.content) == 3 and res.choices[0].message.content.isdigit()


def test_typed_placeholder_mistralrs_style(ckpt):
    """mistral.rs's convention: the user types <image> in the text beside an image part; the
    template's own placeholder is then left out (one placeholder per image either way)."""
    path = ckpt[0]
    runner = Runner(Which.VisionPlain(str(path)), token_source="none", loaded=ckpt[4])
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": _parts([str(path / "tall.img")], "<image>\n" + TEXT)}],
        max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    assert res.choices[0].message.content == _want(ckpt, ["tall"])


def test_more_images_than_the_context_takes_is_a_400(srv, ckpt):
    """32 images x 16 rows pass the tiny model's 512-token context: a 400 (not truncated), and
    the server keeps serving."""
    with pytest.raises(openai.BadRequestError) as e:
        _chat(srv, _parts([_data_uri(ckpt[3]["tiny"])] * 32))
    assert e.value.status_code == 400 and "send fewer images" in e.value.body["message"]
    assert _chat(srv, _parts([_data_uri(ckpt[3]["tall"])])).choices[0].message.content == _want(ckpt, ["tall"])
