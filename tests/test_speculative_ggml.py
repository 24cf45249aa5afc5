"""`speculative` with GGML v3 files on either side of the CLI: a GGML target (tokenizer from -t,
--rope-theta passed as for `ggml`) with a GGUF draft, and a GGUF target with a GGML draft; greedy
text is the target alone's (`ggml` / `gguf` subcommands), whatever the draft proposes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from test_ggml import ROPE_THETA, write_ggjt

MISTRALRS = Path(sys.executable).with_name("mistralrs")
COMMON = ["--raw", "--temperature", "0", "--max-tokens", "12", "--ignore-eos", "--prompt", "the quick brown fox"]  # --gamma-fixed below: drafts always run (no cost policy)


def _noisy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with small weight noise: a draft that agrees often, not always."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec-ggml")
    tok = gb.train_tokenizer()
    tj = str(d / "tokenizer.json")
    tok.save(tj)
    vocab = gb.gguf_vocab(tok)
    tgt_ggml = write_ggjt(d / "target.bin", gb.tiny_llama(0), vocab.tokens)
    tgt_gguf = gb.write_gguf(d / "target.gguf", gb.tiny_llama(0), vocab, qtype=Q.Q8_0)
    draft_gguf = gb.write_gguf(d / "draft.gguf", _noisy(gb.tiny_llama(0)), vocab, qtype=Q.Q8_0)
    draft_ggml = write_ggjt(d / "draft.bin", gb.tiny_llama(5, num_hidden_layers=1), vocab.tokens)
    rt = str(ROPE_THETA)
    runs = {
        "ggml_alone": ["ggml", "-f", str(tgt_ggml), "-t", tj, "--rope-theta", rt, "--gqa", "2"],
        "ggml_target": ["speculative", "-f", str(tgt_ggml), "-t", tj, "--rope-theta", rt, "--gqa", "2",
                        "--draft-file", str(draft_gguf), "-n", "3", "--gamma-fixed"],
        "gguf_alone": ["gguf", "-f", str(tgt_gguf)],
        "ggml_draft": ["speculative", "-f", str(tgt_gguf), "--draft-file", str(draft_ggml), "-t", tj,
                       "--draft-rope-theta", rt, "--draft-gqa", "2", "-n", "3", "--gamma-fixed"],
        "no_tok": ["speculative", "-f", str(tgt_gguf), "--draft-file", str(draft_ggml)],
    }
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(d / "cache")}
    procs = {k: subprocess.Popen([str(MISTRALRS), *COMMON, *a], env=env, text=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, a in runs.items()}
    return {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}


def _drafted(stderr: str) -> tuple[int, int]:
    """(proposed, accepted) from the stats line's "speculative: A/P draft tokens accepted"."""
    m = re.search(r"speculative: (\d+)/(\d+) draft tokens accepted", stderr)
    assert m, stderr
    return int(m.group(2)), int(m.group(1))


def test_ggml_target_equals_target_alone(outs):
    rc, out, err = outs["ggml_target"]
    assert rc == 0, err
    assert outs["ggml_alone"][0] == 0, outs["ggml_alone"][2]
    assert out.strip() and out == outs["ggml_alone"][1]
    proposed, accepted = _drafted(err)
    assert proposed > 0 and accepted > 0  # the noisy copy's drafts ran and some were kept


def test_ggml_draft_equals_target_alone(outs):
    rc, out, err = outs["ggml_draft"]
    assert rc == 0, err
    assert outs["gguf_alone"][0] == 0, outs["gguf_alone"][2]
    assert out.strip() and out == outs["gguf_alone"][1]
    assert _drafted(err)[0] > 0  # the unrelated GGML draft proposed (and was corrected)


def test_ggml_draft_without_tokenizer_is_one_line(outs):
    rc, out, err = outs["no_tok"]
    assert rc != 0 and "Traceback" not in err
    assert "-t/--tok-model-id" in err and len(err.strip().splitlines()) == 1
