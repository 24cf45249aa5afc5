"""LoRA, X-LoRA and speculative decoding under tensor parallelism (--tp 2, gloo, CPU) on a tiny
llama (peft's adapters on all seven projections):

- logits through the real launcher (rank 0 starts its follower, the rows' adapter weights go
  with each step) within 1e-5 of the single-process LoRA run: an F32 plain base with its adapter
  merged, and a Q8_0 GGUF base with two adapters kept beside it, four sequences with different
  adapter sets (none, a1, a2, both) in one forward, and the same beside a plain base quantized
  with --isq Q8_0;
- greedy text through `mistralrs --tp 2 lora-gguf` equal to the single-process run (Q8_0) and
  to peft's greedy continuation (F32);
- X-LoRA (`x-lora-plain`, `x-lora-gguf`): peft's greedy text;
- `speculative` (a draft model on rank 0) and `--spec-ngram`: the single-process greedy text, with
  drafts accepted.
"""
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
from test_lora_peft import SEVEN, _greedy_text, save_adapters, save_base, write_ordering

TOL = 1e-5
SETS = [[], ["a1"], ["a2"], ["a1", "a2"]]
MISTRALRS = Path(sys.executable).with_name("mistralrs")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}

# rank 0: the single-process run, then the same spec with --tp 2 (its follower started by the launcher)
RANK0 = r"""
import dataclasses, sys, torch
sys.path.insert(0, {tests!r})
from test_lora_peft import our_logits
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import GGUFSpec, LoadOptions, LoraSpec, PlainSpec
base = {base!r}
spec = LoraSpec(GGUFSpec(base) if base.endswith(".gguf") else PlainSpec(base), {adapters!r}, {order!r})
opts = LoadOptions(token_source="none", numerics="exact", runtime="torch", device="cpu", isq={isq!r})
sets = {sets!r}
whole = load(spec, opts)
ref = our_logits(whole, sets)
tp = load(spec, dataclasses.replace(opts, tp=2))
assert (tp.adapters is None) == (whole.adapters is None)
torch.save((ref, our_logits(tp, sets)), {out!r})
tp.model.comm.shutdown()
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tp_lora")
    hf = gb.tiny_llama(0)
    base = save_base(hf, d / "base")
    adapters = save_adapters(hf, SEVEN, d / "adapters", seed=3)
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    return {"hf": hf, "d": d, "base": base, "adapters": adapters,
            "merged": write_ordering(d / "merged.json", base, adapters, ["a1"]),
            "preload": write_ordering(d / "preload.json", base, adapters, ["a1"], {"a2": adapters / "a2"}),
            "f32": gb.write_gguf(d / "base.f32.gguf", hf, vocab),
            "q8": gb.write_gguf(d / "base.q8_0.gguf", hf, vocab, qtype=Q.Q8_0)}


def _two_ranks(files: dict, base: Path, order: Path, sets: list, out: Path, isq: str | None = None):
    code = RANK0.format(tests=str(Path(__file__).parent), base=str(base), adapters=str(files["adapters"]),
                        order=str(order), sets=sets, out=str(out), isq=isq)
    run = subprocess.run([sys.executable, "-c", code], env=ENV, text=True, capture_output=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def _check(ref: list, sharded: list) -> None:
    diffs = [float((a - b).abs().max()) for a, b in zip(ref, sharded)]
    assert len(ref) == len(sharded) and max(diffs) <= TOL, diffs
    # the adapters move the logits: a side path left out would not pass for a rounding error
    if len(ref) > 1:
        assert float((ref[0] - ref[-1]).abs().max()) > 100 * TOL


def test_merged_plain_f32(files, tmp_path):
    ref, sharded = _two_ranks(files, files["base"], files["merged"], [["a1"]], tmp_path / "merged.pt")
    _check(ref, sharded)


def test_unmerged_q8_gguf_adapter_sets(files, tmp_path):
    """Per-sequence adapter sets in one forward: A/B split with their (Q8_0) base modules."""
    ref, sharded = _two_ranks(files, files["q8"], files["preload"], SETS, tmp_path / "q8.pt")
    _check(ref, sharded)


def test_unmerged_isq_adapter_sets(files, tmp_path):
    """A plain base quantized at load (--isq Q8_0): its adapters stay beside it, split likewise."""
    ref, sharded = _two_ranks(files, files["base"], files["preload"], SETS, tmp_path / "isq.pt", isq="Q8_0")
    _check(ref, sharded)


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(MISTRALRS), "--raw", "--temperature", "0", "--max-tokens", "8",
                             "--numerics", "exact", "--prompt", "the quick brown fox", *args], env=ENV, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_lora_gguf_greedy_text(files):
    """Q8_0: --tp 2 equals the single-process run; F32: --tp 2 equals peft's greedy text."""
    lora = ["lora-gguf", "-a", str(files["adapters"]), "-o", str(files["preload"])]
    procs = {"q8-tp": _cli("--tp", "2", *lora, "-f", str(files["q8"])),
             "q8-one": _cli(*lora, "-f", str(files["q8"])),
             "f32-tp": _cli("--tp", "2", *lora, "-f", str(files["f32"]))}
    try:
        runs = {k: p.communicate(timeout=300) + (p.returncode,) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for k, (_, err, rc) in runs.items():
        assert rc == 0, (k, err[-3000:])
    assert runs["q8-tp"][0] == runs["q8-one"][0] and runs["q8-tp"][0].strip()
    assert runs["f32-tp"][0].rstrip("\n") == _greedy_text(files["hf"], files["adapters"], "the quick brown fox", 8)


def test_cli_xlora_greedy_text(tmp_path):
    """X-LoRA under --tp 2 (the scaling pass's hidden states come back to rank 0, whose classifier
    weighs the adapters; every rank's sharded side paths take those weights with the step):
    peft's greedy text, on the plain checkpoint and on the F32 GGUF."""
    from xlora_models import build_base, make_xlora, peft_greedy

    base = build_base(tmp_path)
    folder, xm = make_xlora(base, "tp", {"top_k_lora": 2, "softmax_temperature": 0.7})
    tok, prompt, steps = gb.train_tokenizer(), "the quick brown fox", 6
    env = {**ENV, "MISTRALRS_CLI_CACHE": str(tmp_path / "c")}
    common = [str(MISTRALRS), "--tp", "2", "--raw", "--temperature", "0", "--max-tokens", str(steps),
              "--prompt", prompt]
    runs = {  # the plain folder's tokenizer adds no BOS; the GGUF's does
        "plain": (common + ["x-lora-plain", "-m", str(base["plain"]), "-x", str(folder)], tok.encode(prompt).ids),
        "gguf": (common + ["--numerics", "exact", "x-lora-gguf", "-f", str(base["gguf"]), "-x", str(folder)],
                 [0] + tok.encode(prompt).ids)}
    procs = {k: subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for k, (args, _) in runs.items()}  # bytes: the text may hold a CR
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, (k, err[-3000:])
            want = tok.decode(peft_greedy(xm, runs[k][1], steps))
            assert out.decode("utf-8") == want + "\n", (k, out, want)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def test_cli_speculative_greedy_text(tmp_path):
    """Speculative decoding under --tp 2 (the target sharded, the draft whole on rank 0; n-gram
    drafts need no model): the single-process run's greedy text, with drafts accepted."""
    from test_speculative import REPEAT, noisy_copy

    vocab = gb.gguf_vocab(gb.train_tokenizer())
    target = gb.write_gguf(tmp_path / "target.gguf", gb.tiny_llama(0), vocab, qtype=Q.Q8_0)
    draft = gb.write_gguf(tmp_path / "noisy.gguf", noisy_copy(gb.tiny_llama(0), 0.003, 1), vocab, qtype=Q.Q8_0)
    args = ["--numerics", "exact", "--prompt", REPEAT, "--max-tokens", "40", "--temperature", "0"]
    runs = {"one": [*args, "gguf", "-f", str(target)],
            "draft": ["--tp", "2", *args, "speculative", "-f", str(target), "--draft-file", str(draft), "-n", "3",
                      "--gamma-fixed"],
            "ngram": ["--tp", "2", "--spec-ngram", "2", *args, "gguf", "-f", str(target)]}
    procs = {k: subprocess.Popen([str(MISTRALRS), *a], env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for k, a in runs.items()}
    try:
        out = {k: p.communicate(timeout=300) + (p.returncode,) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for k, (text, err, rc) in out.items():
        assert rc == 0, (k, err[-3000:])
        assert text == out["one"][0], k
        if k != "one":
            assert re.search(rb"speculative: [1-9]\d*/\d+ draft tokens accepted", err), (k, err[-500:])
