"""Mistakes a user can make, through the real CLI: each exits non-zero with one `error:` line on
stderr that names the file or flag, and never a traceback. All CLI runs start at once (in a
thread pool) since each spends most of its time importing torch."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.quant.dequant import SUPPORTED

MISTRALRS = Path(sys.executable).with_name("mistralrs")
UNSUPPORTED = Q.TQ1_0  # a ternary type gguf-py knows and our dequantizer does not
GEN = ["--max-tokens", "2", "--prompt", "hi"]


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # after `mistralrs`; {dir} is the test's file directory
    names: tuple[str, ...]  # what the error line must mention
    env: tuple[tuple[str, str], ...] = ()


CASES: dict[str, Case] = {
    "missing-file": Case((*GEN, "gguf", "-f", "/nonexistent.gguf"), ("/nonexistent.gguf",)),
    "random-bytes": Case((*GEN, "gguf", "-f", "{dir}/x.gguf"), ("x.gguf",)),
    "empty-file": Case((*GEN, "gguf", "-f", "{dir}/empty.gguf"), ("empty.gguf",)),
    "cut-in-header": Case((*GEN, "gguf", "-f", "{dir}/cut-header.gguf"), ("cut-header.gguf", "truncated")),
    "cut-in-tensor-data": Case((*GEN, "gguf", "-f", "{dir}/cut-data.gguf"), ("cut-data.gguf", "truncated")),
    "unsupported-arch": Case((*GEN, "gguf", "-f", "{dir}/mamba.gguf"), ("mamba.gguf", "mamba3000")),
    "unsupported-tensor-type": Case((*GEN, "gguf", "-f", "{dir}/tq1.gguf"),
                                    ("tq1.gguf", "blk.0.ffn_down.weight", UNSUPPORTED.name)),
    "absent-repo-offline": Case((*GEN, "gguf", "-m", "some-org/absent-repo", "-f", "x.gguf"),
                                ("some-org/absent-repo", "x.gguf"),
                                (("HF_HUB_OFFLINE", "1"), ("HF_HOME", "{dir}/empty-hf-home"))),
    "negative-max-tokens": Case(("--max-tokens", "-1", "--prompt", "hi", "gguf", "-f", "{dir}/llama.gguf"),
                                ("--max-tokens",)),
    # a GGUF without one gets its family's built-in template; a checkpoint without one has none
    "chat-without-template": Case((*GEN, "plain", "-m", "{dir}/plain"), ("plain", "chat template", "--raw")),
    "device-cuda": Case(("--device", "cuda", *GEN, "gguf", "-f", "{dir}/llama.gguf"), ("--device cuda",)),
    "prompt-and-interactive": Case(("-i", *GEN, "gguf", "-f", "{dir}/llama.gguf"), ("--prompt", "-i")),
}
# a control run: the same checkpoint works as a plain completion
RAW_OK = Case(("--raw", "--temperature", "0", *GEN, "plain", "-m", "{dir}/plain"), ())


def _files(d: Path) -> None:
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    llama = gb.tiny_llama(0, intermediate_size=256)  # 256-wide ffn_down rows: whole TQ1_0 blocks
    real = gb.write_gguf(d / "llama.gguf", llama, vocab).read_bytes()
    gb.write_gguf(d / "mamba.gguf", llama, vocab, architecture="mamba3000")
    gb.write_gguf(d / "tq1.gguf", llama, vocab, tensor_types={"blk.0.ffn_down.weight": UNSUPPORTED})
    (d / "x.gguf").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "empty.gguf").write_bytes(b"")
    (d / "cut-header.gguf").write_bytes(real[:1000])  # inside the token list
    (d / "cut-data.gguf").write_bytes(real[:-1000])  # inside the last tensor
    (d / "empty-hf-home").mkdir()
    llama.save_pretrained(d / "plain")  # config, safetensors; no tokenizer_config.json: no template
    gb.train_tokenizer().save(str(d / "plain" / "tokenizer.json"))


def _run(case: Case, d: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MISTRALRS_CLI_CACHE": str(d / "cache"), "PYTHONIOENCODING": "utf-8"}
    env.update({k: v.format(dir=d) for k, v in case.env})
    return subprocess.run([str(MISTRALRS), *(a.format(dir=d) for a in case.args)], capture_output=True,
                          text=True, encoding="utf-8", env=env, stdin=subprocess.DEVNULL, timeout=180)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("bad_input")
    _files(d)
    runs = {**CASES, "raw-ok": RAW_OK}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, case, d) for name, case in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def test_unsupported_type_is_really_unsupported():
    assert UNSUPPORTED not in SUPPORTED


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_error_line(results, name: str):
    proc = results[name]
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in CASES[name].names:
        assert word in lines[0], (word, lines[0])


def test_raw_completion_works_without_chat_template(results):
    proc = results["raw-ok"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "error:" not in proc.stderr


def test_api_missing_file_raises_user_error():
    from mistralrs_cli import Runner, Which
    from mistralrs_cli.errors import UserError

    with pytest.raises(UserError, match="/nonexistent.gguf"):
        Runner(which=Which.GGUF(quantized_model_id=None, quantized_filename="/nonexistent.gguf"))
