"""Tiny random llama and gemma3 models, written to GGUF as llama.cpp's converter does, against
transformers: logits of a 12-token prefill and 8 cached decode steps (F32 files, 1e-4), our Q8_0
loading against transformers loading the same Q8_0 file (1e-3), and greedy text through the CLI
and the Python API equal to transformers' greedy tokens decoded by our tokenizer."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
import parity
from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.loaders.tokenizer import Tokenizer, tokenizer_from_gguf
from mistralrs_cli.models.layers import Batch, SeqSlice

PROMPT = "The quick brown fox jumps over the lazy dog!"
PROMPT_TOKENS = 12  # with BOS
STEPS = 8
F32_TOL, Q8_TOL = 1e-4, 1e-3
MIN_MARGIN = 1e-3  # greedy tokens are compared only where transformers' top-2 gap exceeds this
MISTRALRS = Path(sys.executable).with_name("mistralrs")
# transformers has no GGUF key for these; llama.cpp derives them (query scale = head_dim)
HF_GGUF_OVERRIDES = {"gemma3": {"query_pre_attn_scalar": 32}}
BUILDERS = {"llama": (gb.tiny_llama, 0), "gemma3": (gb.tiny_gemma3, 3)}  # builder, seed


@dataclass
class Case:
    name: str
    hf: torch.nn.Module
    f32: Path
    q8: Path
    cli: subprocess.Popen  # `mistralrs --raw --prompt PROMPT gguf -f f32`, started early
    tokenizer: Tokenizer | None = None  # ours, from the F32 file's metadata
    ids: list[int] = field(default_factory=list)  # PROMPT through our tokenizer, with BOS
    logits: list[torch.Tensor] = field(default_factory=list)  # transformers: prefill (T, V), then (V,) per step
    greedy: list[int] = field(default_factory=list)  # transformers' greedy tokens
    margins: list[float] = field(default_factory=list)  # top-2 gap behind each greedy token

    def expected_tokens(self) -> list[int]:
        """Greedy tokens up to the first near-tie, and up to EOS (which ends generation)."""
        out = []
        for tok, margin in zip(self.greedy, self.margins):
            if margin <= MIN_MARGIN or tok in self.tokenizer.eos_ids:
                break
            out.append(tok)
        return out

    def complete(self) -> bool:
        return len(self.expected_tokens()) == STEPS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf_models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISTRALRS_CLI_CACHE", str(path / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def vocab() -> gb.GGUFVocab:
    return gb.gguf_vocab(gb.train_tokenizer())


def _reference(hf: torch.nn.Module, ids: list[int]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    return parity.hf_steps(hf, ids, STEPS)


def _start_cli(path: Path) -> subprocess.Popen:
    """The CLI run starts as soon as its file exists, so its torch import overlaps other tests."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    args = ["--raw", "--temperature", "0", "--max-tokens", str(STEPS), "--prompt", PROMPT]
    return subprocess.Popen([str(MISTRALRS), *args, "gguf", "-f", str(path)], env=env, text=True,
                            encoding="utf-8", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def cases(workdir, vocab) -> dict[str, Case]:
    built = {}
    for name, (build, seed) in sorted(BUILDERS.items()):
        hf = build(seed)
        f32 = gb.write_gguf(workdir / f"{name}-f32.gguf", hf, vocab)
        q8 = gb.write_gguf(workdir / f"{name}-q8_0.gguf", hf, vocab, qtype=Q.Q8_0)
        built[name] = Case(name, hf, f32, q8, cli=_start_cli(f32))
    try:
        for case in built.values():
            case.tokenizer = tokenizer_from_gguf(GGUFFile(case.f32).metadata)
            case.ids = case.tokenizer.encode(PROMPT)
            assert len(case.ids) == PROMPT_TOKENS and case.ids[0] == vocab.bos_id
            case.logits, case.greedy, case.margins = _reference(case.hf, case.ids)
        yield built
    finally:
        for case in built.values():
            if case.cli.poll() is None:
                case.cli.kill()
            case.cli.communicate()


@pytest.fixture(params=sorted(BUILDERS))
def case(request, cases) -> Case:
    return cases[request.param]


def _ours(path: Path, ids: list[int], greedy: list[int]) -> list[torch.Tensor]:
    """Our model, prefill then one cached step per token of `greedy` (teacher-forced)."""
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")  # transformers does no rounding
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    n = len(ids)
    with torch.inference_mode():
        out = [model(torch.tensor(ids), Batch(torch.arange(n), [SeqSlice(0, n, cache)]))]
        for i, tok in enumerate(greedy):
            step = Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)])
            out.append(model(torch.tensor([tok]), step)[0])
    return out


def _max_diffs(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    assert [g.shape for g in got] == [w.shape for w in want]
    return [float((g - w).abs().max()) for g, w in zip(got, want)]


def test_vocab_round_trips(case: Case):
    """Our GGUF tokenizer gives the trained tokenizer's ids (plus BOS) and decodes back."""
    trained = gb.train_tokenizer()
    assert case.ids[1:] == trained.encode(PROMPT).ids
    assert case.tokenizer.decode(case.ids, skip_special_tokens=True) == PROMPT


def test_f32_logits_match_transformers(case: Case):
    diffs = _max_diffs(_ours(case.f32, case.ids, case.greedy), case.logits)
    print(f"{case.name} f32 max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < F32_TOL, diffs


def test_q8_0_matches_transformers_on_same_file(case: Case):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = GGUFFile(case.q8).architecture
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        pytest.skip(f"transformers cannot load GGUF architecture {arch}")
    assert {t.qtype for t in GGUFFile(case.q8).tensors.values()} == {Q.Q8_0, Q.F32}
    hf = AutoModelForCausalLM.from_pretrained(case.q8.parent, gguf_file=case.q8.name,
                                              **HF_GGUF_OVERRIDES.get(arch, {})).eval()
    # both run the F32 model's greedy tokens: ours cached step by step, transformers in one pass
    ours = _ours(case.q8, case.ids, case.greedy)
    with torch.no_grad():
        full = hf(torch.tensor([case.ids + case.greedy])).logits[0]
    n = len(case.ids)
    want = [full[:n]] + list(full[n:])
    diffs = _max_diffs(ours, want)
    print(f"{case.name} q8_0 vs transformers-gguf max |logit diff| {max(diffs):.2e}")
    assert max(diffs) < Q8_TOL, diffs
    # and the quantization is real: Q8_0 moves the logits away from the F32 model's
    assert max(_max_diffs(ours[:1], case.logits[:1])) > Q8_TOL


def _expected_text(case: Case) -> str:
    return case.tokenizer.decode(case.expected_tokens())


def _check_text(case: Case, text: str) -> None:
    if case.complete():
        assert text == _expected_text(case)
    else:  # a near-tie or EOS within the 8 steps: the output agrees up to there
        assert text.startswith(_expected_text(case))


def test_cli_greedy_matches_transformers(case: Case):
    stdout, stderr = case.cli.communicate(timeout=180)
    assert case.cli.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stdout.endswith("\n")
    _check_text(case, stdout[:-1])
    assert f"prompt: {PROMPT_TOKENS} tokens" in stderr


def test_api_greedy_matches_transformers(case: Case):
    from mistralrs_cli import CompletionRequest, Runner, Which

    runner = Runner(which=Which.GGUF(quantized_model_id=None, quantized_filename=str(case.f32)),
                    token_source="none")
    assert runner.tokenize_text(PROMPT) == case.ids
    res = runner.send_completion_request(
        CompletionRequest(prompt=PROMPT, max_tokens=STEPS, temperature=0.0))
    choice = res.choices[0]
    _check_text(case, choice.text)
    assert res.usage.prompt_tokens == PROMPT_TOKENS
    if case.complete():
        assert res.usage.completion_tokens == STEPS and choice.finish_reason == "length"


def test_seeds_give_clear_greedy_margins(case: Case):
    """Guards the tests above: with near-ties they would only compare a prefix."""
    assert case.complete(), (case.greedy, case.margins)
