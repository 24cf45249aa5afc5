"""Greedy text through `mistralrs --raw --prompt ... plain -m DIR` and through the Python API
equals transformers' greedy continuation (decoded by our tokenizer) for every architecture whose
logits test_plain.py / test_plain_archs*.py compare and whose text they do not already check:
Mistral, Mixtral, Qwen2, Qwen3, Gemma 2, StarCoder2 and Phi-3. Half of the checkpoints are
rewritten in the hub spelling (rope_theta, torch_dtype, no generation_config.json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gguf_builder as gb
import parity

PROMPT = "The quick brown fox jumps over the lazy dog!"  # 12 tokens with BOS
STEPS = 8
MIN_MARGIN = 1e-3  # transformers' top-2 gap at every greedy step: no near-ties to argue about
MISTRALRS = Path(sys.executable).with_name("mistralrs")

# name -> (builder, write the hub spelling); seeds picked for clear greedy margins
MODELS = {
    "mistral": (lambda: gb.tiny_mistral(1), True),
    "mixtral": (lambda: gb.tiny_mixtral(3), False),
    "qwen2": (lambda: gb.tiny_qwen2(2), False),
    "qwen3": (lambda: gb.tiny_qwen3(3), True),
    "gemma2": (lambda: gb.tiny_gemma2(2), True),
    "starcoder2": (lambda: gb.tiny_starcoder2(2), False),
    "phi3": (lambda: gb.tiny_phi3(1), True),
}


def _hub_spelling(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint dir with tokenizer, transformers model)."""
    root = tmp_path_factory.mktemp("plain_text")
    out = {}
    for name, (make, hub) in MODELS.items():
        hf, path = make(), root / name
        hf.save_pretrained(path)
        gb.train_tokenizer().save(str(path / "tokenizer.json"))
        tok_cfg = {"bos_token": gb.BOS, "eos_token": gb.EOS, "add_bos_token": True, "add_eos_token": False}
        (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        if hub:
            _hub_spelling(path)
        out[name] = (path, hf)
    return out


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(MISTRALRS), *args], env=env, text=True, encoding="utf-8",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_and_api_greedy_text_match_transformers(built, tmp_path, monkeypatch):
    from mistralrs_cli import CompletionRequest, Runner, Which
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import LoadOptions, PlainSpec

    monkeypatch.setenv("MISTRALRS_CLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    procs = {n: _cli("--raw", "--max-tokens", str(STEPS), "--prompt", PROMPT, "plain", "-m", str(p))
             for n, (p, _) in built.items()}
    for name, proc in procs.items():
        path, hf = built[name]
        tok = load(PlainSpec(str(path)), LoadOptions(token_source="none")).tokenizer
        ids = tok.encode(PROMPT)
        assert len(ids) == 12 and ids[0] == tok.bos_id
        _, greedy, margins = parity.hf_steps(hf, ids, STEPS)
        assert min(margins) > MIN_MARGIN and not set(greedy) & set(tok.eos_ids), (name, greedy, margins)
        want = tok.decode(greedy)
        runner = Runner(which=Which.Plain(str(path)), token_source="none")
        res = runner.send_completion_request(CompletionRequest(prompt=PROMPT, max_tokens=STEPS, temperature=0.0))
        assert res.choices[0].text == want, (name, res.choices[0].text, want)
        assert res.usage.prompt_tokens == 12 and res.usage.completion_tokens == STEPS
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "Traceback" not in stderr, (name, stderr)
        assert stdout[:-1] == want, (name, stdout, want)
