"""Start-up of the one-shot GGUF path (`mistralrs --prompt ... gguf -f FILE`): what it imports, and
how loaders/load.py's load_gguf overlaps the weight repack with the tokenizer and chat template.

The import check runs the CLI in a fresh interpreter and reads its sys.modules at exit: none of the
heavy libraries that only other paths use (torch for the torch models, the server's web stack,
the grammar engine, image decoding, the hub client, the interactive prompt) may be loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from gguf_craft import fresh_cache
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders import load as load_mod
from mistralrs_cli.types import GGUFSpec, LoadOptions

# the top-level packages the one-shot GGUF path must not import
HEAVY = ("torch", "transformers", "safetensors", "fastapi", "starlette", "uvicorn", "llguidance", "PIL",
         "huggingface_hub", "prompt_toolkit", "rich", "cupy")
REAL = Path(os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli") / "models"

_RUN = """import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr))
sys.argv = ['mistralrs', *json.loads(sys.argv[1])]
runpy.run_module('mistralrs_cli', run_name='__main__')
"""


def _modules(args: list[str], tmp_path) -> set[str]:
    # a fresh cache that shares the compiled kernels (no compile per test)
    env = {**os.environ, "MISTRALRS_CLI_CACHE": str(fresh_cache(tmp_path / "cache")), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no text generated"
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES "))
    return set(json.loads(line[len("MODULES "):]))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup") / "tiny.gguf"
    return gb.write_gguf(path, gb.tiny_llama(1), vocab=gb.gguf_vocab(gb.train_tokenizer()), qtype=Q.Q8_0)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "chat"])
def test_gguf_one_shot_imports_no_heavy_library(tiny_gguf, tmp_path, raw):
    args = [*(["--raw"] if raw else []), "--temperature", "0", "--max-tokens", "3", "--prompt", "hello world",
            "gguf", "-f", str(tiny_gguf)]
    loaded = _modules(args, tmp_path)
    assert "mistralrs_cli" in loaded and "numpy" in loaded  # the probe saw the run
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"])
def test_real_model_one_shot_imports_no_heavy_library(name, tmp_path):
    """The same on the two real models (BPE tokenizer.json and SentencePiece vocabularies)."""
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} is not on this machine (scripts/fetch_models.py)")
    loaded = _modules(["--temperature", "0", "--max-tokens", "2", "--prompt", "Hi", "gguf", "-f", str(path)],
                      tmp_path)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_repack_runs_beside_the_tokenizer(tiny_gguf, monkeypatch):
    """load_gguf builds the native model on another thread while this one builds the tokenizer:
    each side waits for the other to have started, which deadlocks (and times out) if they ran
    one after the other."""
    started = {"model": threading.Event(), "tokenizer": threading.Event()}
    threads = {}
    native, tokenizer = load_mod._native_model, load_mod._tokenizer

    def model_side(*args):
        threads["model"] = threading.current_thread()
        started["model"].set()
        assert started["tokenizer"].wait(30), "the tokenizer did not start while the model was loading"
        return native(*args)

    def tokenizer_side(*args):
        threads["tokenizer"] = threading.current_thread()
        started["tokenizer"].set()
        assert started["model"].wait(30), "the model did not start while the tokenizer was loading"
        return tokenizer(*args)

    monkeypatch.setattr(load_mod, "_native_model", model_side)
    monkeypatch.setattr(load_mod, "_tokenizer", tokenizer_side)
    loaded = load_mod.load(GGUFSpec(str(tiny_gguf)), LoadOptions(token_source="none", device="cpu"))
    assert threads["model"] is not threads["tokenizer"]
    assert type(loaded.model).__name__ == "NativeModel"
    assert loaded.tokenizer.encode("hello world") and loaded.chat_template is not None


@pytest.mark.parametrize("failing, expected", [
    (("model", "tokenizer", "template"), "model"),
    (("tokenizer", "template"), "tokenizer"),
    (("template",), "template"),
])
def test_load_errors_come_in_sequential_order(tiny_gguf, monkeypatch, failing, expected):
    """With the model, tokenizer and template built side by side, the error shown is the one a
    sequential load would raise first: the model's, then the tokenizer's, then the template's."""
    def fail(what, real):
        def call(*args):
            if what in failing:
                raise UserError(f"{what} failed")
            return real(*args)
        return call

    for what, attr in (("model", "_native_model"), ("tokenizer", "_tokenizer"), ("template", "_chat_template")):
        monkeypatch.setattr(load_mod, attr, fail(what, getattr(load_mod, attr)))
    with pytest.raises(UserError, match=f"^{expected} failed$"):
        load_mod.load(GGUFSpec(str(tiny_gguf)), LoadOptions(token_source="none", device="cpu"))
