"""Greedy text through `mistralrs --raw --prompt ... plain -m DIR` and through the Python API
equals transformers' greedy continuation (decoded by our tokenizer) for every architecture whose
logits test_plain.py / test_plain_archs*.py compare and whose text they do not already check:
Mistral, Mixtral, Qwen2, Qwen3, Gemma 2, StarCoder2 and Phi-3. Half of the checkpoints are
rewritten in the hub spelling (rope_theta, torch_dtype, no generation_config.json)."""
from __future__ import annotations


import pytest

import gguf_builder as gb
import parity
from test_plain_archs2 import _save as save_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog!"  # 12 tokens with BOS
STEPS = 8
MIN_MARGIN = 1e-3  # transformers' top-2 gap at every greedy step: no near-ties to argue about

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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint dir with tokenizer, transformers model)."""
    root = tmp_path_factory.mktemp("plain_text")
    out = {}
    for name, (make, hub) in MODELS.items():
        hf = make()
        out[name] = (save_checkpoint(hf, root / name, hub), hf)
    return out


def test_cli_and_api_greedy_text_match_transformers(built, tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRALRS_CLI_CACHE", str(tmp_path / "cache"))
    parity.check_cli_and_api_text(built, PROMPT, STEPS, MIN_MARGIN)
