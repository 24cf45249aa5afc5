"""Tensor parallelism (--tp 2, gloo, CPU) on tiny llama, mistral, qwen2, gemma3, phi3 and mixtral:

- the sharded model's logits (a 12-token prefill and 4 cached decode steps) within 1e-5 of the
  same model unsharded, as plain F32, GGUF F32, GGUF Q8_0 and (llama, phi3, mixtral) plain with
  --isq Q8_0 (both ranks in one spawned pair);
  the plain F32 ones also within 1e-4 of transformers';
- greedy text through the CLI (`mistralrs --tp 2`, which starts its second rank itself) equal to
  transformers' greedy tokens decoded by the model's tokenizer;
- a row-parallel split that cuts a Q8_0 block: one error naming the tensor and --tp.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
import parity

ARCHS = {"llama": (gb.tiny_llama, 0), "mistral": (gb.tiny_mistral, 1), "qwen2": (gb.tiny_qwen2, 2),
         "gemma3": (gb.tiny_gemma3, 3), "phi3": (gb.tiny_phi3, 4), "mixtral": (gb.tiny_mixtral, 5),
         # one KV head for 2 ranks: each rank holds a copy of it
         "llama-mqa": (lambda seed: gb.tiny_llama(seed, num_key_value_heads=1), 6)}
IDS = [0, 37, 120, 301, 44, 9, 260, 77, 500, 18, 211, 3]  # BOS, then arbitrary ids
STEPS = 4
ISQ_ARCHS = ("llama", "phi3", "mixtral")  # --isq Q8_0 on the plain checkpoint, then sharded
TP_TOL, HF_TOL = 1e-5, 1e-4
MISTRALRS = Path(sys.executable).with_name("mistralrs")
PROMPT = "the quick brown fox"
MAX_TOKENS = 8


def write_plain(path: Path, hf: torch.nn.Module) -> Path:
    hf.save_pretrained(path)
    gb.train_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp_models")
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    built = {}
    for name, (build, seed) in ARCHS.items():
        hf = build(seed)
        built[name] = dict(hf=hf, plain=write_plain(root / name, hf),
                           f32=gb.write_gguf(root / f"{name}-f32.gguf", hf, vocab),
                           q8=gb.write_gguf(root / f"{name}-q8_0.gguf", hf, vocab, qtype=Q.Q8_0))
    return built


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(fmt: str, path: Path):
    from mistralrs_cli.types import GGUFSpec, PlainSpec

    return PlainSpec(str(path)) if fmt in ("plain", "isq") else GGUFSpec(str(path.name), str(path.parent))


def _rank(rank: int, world: int, port: int, cases: list, greedy: dict, out: str) -> None:
    """One rank: each case loaded whole (the reference), then sharded; rank 0 saves both."""
    import torch.distributed as dist

    from mistralrs_cli.distributed.tp_layers import shard_model
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import LoadOptions

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, fmt, path in cases:
        opts = LoadOptions(device="cpu", runtime="torch", numerics="exact", isq="Q8_0" if fmt == "isq" else None)
        model = load(_spec(fmt, path), opts).model
        model.native = None
        cfg = model.config
        whole = parity.our_steps(model, cfg, IDS, greedy[name])
        plan = shard_model(model, rank, world)
        sharded = parity.our_steps(model, dataclasses.replace(cfg, num_key_value_heads=plan.local_kv), IDS,
                                   greedy[name])
        results[(name, fmt)] = (whole, sharded)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_logits(models, tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    greedy = {}
    reference = {}
    for name, m in models.items():
        reference[name], greedy[name], _ = parity.hf_steps(m["hf"], IDS, STEPS)
    cases = [(name, fmt, m[fmt]) for name, m in models.items() for fmt in ("plain", "f32", "q8")]
    cases += [(name, "isq", models[name]["plain"]) for name in ISQ_ARCHS]
    out = str(tmp_path_factory.mktemp("tp_out") / "logits.pt")
    mp.spawn(_rank, args=(2, _free_port(), cases, greedy, out), nprocs=2)
    return {"results": torch.load(out), "reference": reference}


@pytest.mark.parametrize("name,fmt", [(n, f) for n in ARCHS for f in ("plain", "f32", "q8")]
                         + [(n, "isq") for n in ISQ_ARCHS])
def test_two_ranks_match_one(tp_logits, name, fmt):
    whole, sharded = tp_logits["results"][(name, fmt)]
    diffs = [float((a - b).abs().max()) for a, b in zip(whole, sharded)]
    assert max(diffs) <= TP_TOL, diffs
    if fmt == "plain":  # and the sharded model against transformers itself
        hf_diffs = [float((a - b).abs().max()) for a, b in zip(sharded, tp_logits["reference"][name])]
        assert max(hf_diffs) <= HF_TOL, hf_diffs


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(MISTRALRS), *args], env=env, text=True, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def hf_greedy_text(hf: torch.nn.Module, prompt: str, n: int) -> str:
    """transformers' greedy continuation of the raw prompt, decoded by the tokenizer."""
    tok = gb.train_tokenizer()
    ids = tok.encode(prompt).ids
    _, greedy, _ = parity.hf_steps(hf, ids, n)
    return tok.decode(greedy)


@pytest.fixture(scope="module")
def cli_runs(models) -> dict:
    """`mistralrs --tp 2` on every model at once (their start-ups overlap)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    procs = {name: subprocess.Popen(
        [str(MISTRALRS), "--tp", "2", "--raw", "--prompt", PROMPT, "--temperature", "0", "--max-tokens",
         str(MAX_TOKENS), "--ignore-eos", "plain", "-m", str(m["plain"])], env=env, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, m in models.items()}
    try:
        return {name: (*p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("name", list(ARCHS))
def test_cli_greedy_text(models, cli_runs, name):
    out, err, rc = cli_runs[name]
    assert rc == 0, err
    assert out.rstrip("\n") == hf_greedy_text(models[name]["hf"], PROMPT, MAX_TOKENS)


def test_block_split_error(tmp_path):
    """MLP width 96 over 2 ranks: 48 inputs per rank of down_proj, not whole 32-value Q8_0 blocks."""
    hf = gb.tiny_llama(0, intermediate_size=96)
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    path = gb.write_gguf(tmp_path / "w96.gguf", hf, vocab, qtype=Q.Q8_0)
    run = _cli("--tp", "2", "--prompt", "hi", "gguf", "-f", str(path))
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert re.search(r"--tp 2: model\.layers\.\d+\.mlp\.down_proj .* Q8_0 blocks of 32", lines[0]), lines[0]


def test_api_names_its_fields(models):
    from mistralrs_cli.api import Runner, Which
    from mistralrs_cli.errors import UserError

    with pytest.raises(UserError, match=r"^tensor_parallel_size must be a whole number of ranks"):
        Runner(which=Which.Plain(model_id=str(models["llama"]["plain"])), tensor_parallel_size=0)
    with pytest.raises(UserError, match=r"^dist_backend 'mpi' is not one of gloo, nccl"):
        Runner(which=Which.Plain(model_id=str(models["llama"]["plain"])), tensor_parallel_size=2, dist_backend="mpi")


def test_bad_tp_value():
    run = _cli("--tp", "0", "--prompt", "hi", "plain", "-m", "nowhere")
    assert run.returncode != 0 and "--tp must be a whole number of ranks" in run.stderr
    assert "Traceback" not in run.stderr
