"""The CLI as a shell script uses it: stdout carries only the completion, stats go to stderr;
model ids resolve from a local Hugging Face cache offline; -t takes a tokenizer.json; the
context limit is enforced (or the prompt truncated); --log writes JSON lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gguf_builder as gb

MISTRALRS = Path(sys.executable).with_name("mistralrs")


def _run(args: list[str], env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(MISTRALRS), *args], capture_output=True, text=True, input=stdin,
                          env=full_env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    tok = gb.train_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    gb.write_gguf(d / "llama.gguf", gb.tiny_llama(0, max_position_embeddings=64), gb.gguf_vocab(tok))
    return d


def test_stdout_is_only_the_completion(smollm2_path):
    p = _run(["--raw", "--temperature", "0", "--max-tokens", "8", "--prompt", "The capital of France is", "gguf", "-f", str(smollm2_path)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and "tok/s" not in p.stdout
    assert "prompt: 5 tokens" in p.stderr and "generated: 8 tokens" in p.stderr


def test_prompt_from_stdin_and_chat_template(smollm2_path, tmp_path):
    log = tmp_path / "requests.jsonl"
    p = _run(["--log", str(log), "--temperature", "0", "--max-tokens", "12", "--prompt", "-", "gguf", "-f", str(smollm2_path)],
             stdin="What is the capital of France?")
    assert p.returncode == 0, p.stderr
    direct = _run(["--temperature", "0", "--max-tokens", "12", "--prompt", "What is the capital of France?", "gguf", "-f", str(smollm2_path)])
    assert p.stdout == direct.stdout and p.stdout.strip()  # stdin is the same prompt, greedy
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["request", "response"]
    assert lines[0]["body"]["prompt"] == "What is the capital of France?"
    assert lines[1]["body"]["text"] == p.stdout.rstrip("\n")


def test_model_id_from_offline_hf_cache(smollm2_path, tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-GGUF" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / smollm2_path.name).symlink_to(smollm2_path)
    (tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-GGUF" / "refs").mkdir()
    (tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-GGUF" / "refs" / "main").write_text("a" * 40)
    p = _run(["--raw", "--temperature", "0", "--max-tokens", "4", "--prompt", "Hello", "gguf", "-m", "HuggingFaceTB/SmolLM2-GGUF",
              "-f", smollm2_path.name], env={"HF_HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert "generated: 4 tokens" in p.stderr


def test_tokenizer_json_with_t(tiny):
    base = _run(["--raw", "--temperature", "0", "--max-tokens", "4", "--prompt", "hello world", "gguf", "-f", str(tiny / "llama.gguf")])
    with_t = _run(["--raw", "--temperature", "0", "--max-tokens", "4", "--prompt", "hello world", "gguf", "-f", str(tiny / "llama.gguf"),
                   "-t", str(tiny / "tokenizer.json")])
    assert base.returncode == 0 and with_t.returncode == 0, with_t.stderr
    # the GGUF vocab was written from this same tokenizer: the same prompt, the same tokens
    assert base.stdout == with_t.stdout


def test_prompt_longer_than_context(tiny):
    long = " ".join(["hello world"] * 80)  # far over the 64-token context
    p = _run(["--raw", "--max-tokens", "2", "--prompt", long, "gguf", "-f", str(tiny / "llama.gguf")])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--truncate-sequence" in err[0] and "64" in err[0]
    ok = _run(["--truncate-sequence", "--raw", "--max-tokens", "2", "--prompt", long, "gguf", "-f",
               str(tiny / "llama.gguf")])
    assert ok.returncode == 0, ok.stderr


def test_help_lists_only_what_exists():
    p = _run(["--help"])
    assert p.returncode == 0
    for flag in ("--prompt", "--interactive", "--raw", "--max-tokens", "--top-k", "--min-p", "--repeat-last-n",
                 "--ignore-eos", "--seed", "--chat-template", "--token-source", "--device", "--dtype", "--numerics", "--log"):
        assert flag in p.stdout
    commands = p.stdout.split("Commands:")[1].split()
    assert "gguf" in commands
    for flag in ("--port", "--host", "--serve-ip", "--api-key", "--max-seqs", "--no-paged-attn", "--pa-blk-size",
                 "--pa-gpu-mem", "--pa-gpu-mem-usage", "--pa-ctxt-len", "--prefix-cache-n", "--no-kv-cache",
                 "--request-logging-file"):
        assert flag in p.stdout
    assert "plain" in commands and "ggml" in commands
    assert {"lora", "lora-plain", "lora-gguf", "lora-ggml", "speculative"} <= set(commands)


def test_numerics(smollm2_path):
    """--numerics precise (native kernels, ~16-bit activations) writes the same greedy text as
    --numerics exact (every weight dequantized, the torch path); a wrong value is one error line,
    and the old name llama.cpp says what the 8-bit path is called now and why the name went."""
    args = ["--raw", "--temperature", "0", "--max-tokens", "24", "--prompt", "The three primary colors are",
            "gguf", "-f", str(smollm2_path)]
    precise, exact = _run(["--numerics", "precise", *args]), _run(["--numerics", "exact", *args])
    assert precise.returncode == 0 and exact.returncode == 0, precise.stderr + exact.stderr
    assert precise.stdout.strip() and precise.stdout == exact.stdout
    bad = _run(["--numerics", "fastest", *args])
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "error: --numerics 'fastest' is not one of fast, precise, exact.")
    old = _run(["--numerics", "llama.cpp", *args])
    assert old.returncode == 1 and len(old.stderr.strip().splitlines()) == 1
    assert "now called 'fast'" in old.stderr and "does not reproduce llama.cpp" in old.stderr
