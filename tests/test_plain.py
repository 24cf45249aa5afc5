"""`plain`: tiny random transformers checkpoints saved with save_pretrained (transformers 5's
`rope_parameters`/`dtype`) and rewritten in the hub spelling (`rope_theta`/`torch_dtype`), loaded
by our safetensors loader: logits of a 12-token prefill and 8 cached decode steps equal
transformers' (f32, 1e-4), sharded and tied checkpoints, greedy text through the CLI and the
Python API, and every bad input as one `error:` line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gguf_builder as gb
import parity
from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.layers import Batch, SeqSlice
from mistralrs_cli.types import LoadOptions, PlainSpec

PROMPT = "The quick brown fox jumps over the lazy dog!"
PROMPT_TOKENS = 12  # with BOS
STEPS = 8
F32_TOL = 1e-4
MIN_MARGIN = 1e-3
MISTRALRS = Path(sys.executable).with_name("mistralrs")
DIFFS: dict[str, float] = {}


def _save(model: torch.nn.Module, path: Path, hub_spelling: bool = False, **kw) -> Path:
    """save_pretrained + our trained tokenizer; hub_spelling rewrites config.json the way
    checkpoints on the Hub spell it and drops generation_config.json."""
    model.save_pretrained(path, **kw)
    gb.train_tokenizer().save(str(path / "tokenizer.json"))
    tok_cfg = {"bos_token": gb.BOS, "eos_token": gb.EOS, "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if hub_spelling:
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        if "full_attention" in rope:  # gemma3: global and local bases, layer_types derived
            cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
            cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
            cfg["sliding_window_pattern"] = cfg.pop("_sliding_window_pattern")
            del cfg["layer_types"]
        else:
            cfg["rope_theta"] = rope["rope_theta"]
            cfg["rope_scaling"] = None
            cfg["head_dim"] = None  # derived: hidden / heads
        cfg["torch_dtype"] = cfg.pop("dtype")
        (path / "config.json").write_text(json.dumps(cfg))
        (path / "generation_config.json").unlink()
    return path


def _reference(hf: torch.nn.Module, ids: list[int]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    return parity.hf_steps(hf, ids, STEPS)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MISTRALRS_CLI_CACHE", str(path / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def built(env):
    """name -> (checkpoint dir, transformers model); llama dirs share one set of weights."""
    llama, gemma = gb.tiny_llama(0), gb.tiny_gemma3(3)
    tied = gb.tiny_llama(1, tie_word_embeddings=True)
    return {
        "llama": (_save(llama, env / "llama"), llama),
        "llama-hub": (_save(llama, env / "llama-hub", hub_spelling=True), llama),
        "llama-sharded": (_save(llama, env / "llama-sharded", max_shard_size="20KB"), llama),
        "llama-tied": (_save(tied, env / "llama-tied"), tied),
        "gemma3": (_save(gemma, env / "gemma3"), gemma),
        "gemma3-hub": (_save(gemma, env / "gemma3-hub", hub_spelling=True), gemma),
    }


@pytest.fixture(scope="module")
def refs(built):
    """name -> (our ids, transformers' logits, greedy tokens, margins, our Loaded)."""
    out = {}
    for name, (path, hf) in built.items():
        loaded = load(PlainSpec(str(path)), LoadOptions(token_source="none"))
        ids = loaded.tokenizer.encode(PROMPT)
        out[name] = (ids, *_reference(hf, ids), loaded)
    return out


def _ours(model, cfg, ids: list[int], greedy: list[int]) -> list[torch.Tensor]:
    return parity.our_steps(model, cfg, ids, greedy)


def _expected(ref) -> list[int]:
    ids, _, greedy, margins, loaded = ref
    toks = []
    for tok, margin in zip(greedy, margins):
        if margin <= MIN_MARGIN or tok in loaded.tokenizer.eos_ids:
            break
        toks.append(tok)
    return toks


def _check_text(ref, text: str) -> None:
    want = ref[4].tokenizer.decode(_expected(ref))
    assert text == want if len(_expected(ref)) == STEPS else text.startswith(want)


NAMES = ["llama", "llama-hub", "llama-sharded", "llama-tied", "gemma3", "gemma3-hub"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, refs, built):
    ids, logits, greedy, _, loaded = refs[name]
    assert len(ids) == PROMPT_TOKENS and ids[0] == loaded.tokenizer.bos_id
    got = _ours(loaded.model, loaded.config, ids, greedy)
    diffs = [float((g - w).abs().max()) for g, w in zip(got, logits)]
    DIFFS[name] = max(diffs)
    print(f"{name} max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < F32_TOL, diffs


def test_checkpoint_variants_are_what_they_claim(built, refs):
    sharded = built["llama-sharded"][0]
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in load_file(built["llama-tied"][0] / "model.safetensors")
    assert refs["llama-tied"][4].config.tie_word_embeddings
    hub_cfg = json.loads((built["llama-hub"][0] / "config.json").read_text())
    assert "rope_theta" in hub_cfg and "rope_parameters" not in hub_cfg and "torch_dtype" in hub_cfg
    assert refs["llama"][4].config.rope_theta == refs["llama-hub"][4].config.rope_theta == 50000.0
    assert refs["gemma3-hub"][4].config.layer_types == refs["gemma3"][4].config.layer_types
    assert refs["gemma3"][4].config.rope_local_base_freq == 10000.0
    assert 1 in refs["llama"][4].eos_ids


def test_greedy_margins_are_clear(refs):
    for name in ("llama", "gemma3"):
        assert len(_expected(refs[name])) == STEPS, (refs[name][2], refs[name][3])


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(MISTRALRS), *args], env=env, text=True, encoding="utf-8",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_and_api_greedy_match_transformers(built, refs):
    from mistralrs_cli import CompletionRequest, Runner, Which

    procs = {n: _cli("--raw", "--temperature", "0", "--max-tokens", str(STEPS), "--prompt", PROMPT,
                     "plain", "-m", str(built[n][0])) for n in ("llama", "gemma3")}
    for name, proc in procs.items():
        runner = Runner(which=Which.Plain(str(built[name][0])), token_source="none")
        res = runner.send_completion_request(CompletionRequest(prompt=PROMPT, max_tokens=STEPS, temperature=0.0))
        _check_text(refs[name], res.choices[0].text)
        assert res.usage.prompt_tokens == PROMPT_TOKENS
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr
        _check_text(refs[name], stdout[:-1])
        assert f"prompt: {PROMPT_TOKENS} tokens" in stderr


def test_dtype_bf16(built):
    loaded = load(PlainSpec(str(built["llama"][0])), LoadOptions(token_source="none", dtype="bf16"))
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    cache = SeqKVCache(2, 2, 16)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([0, 5, 6]), Batch(torch.arange(3), [SeqSlice(0, 3, cache)]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def _broken(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn):
    def edit(d: Path) -> None:
        tensors = load_file(d / "model.safetensors")
        fn(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def test_bad_inputs_are_one_error_line(env, built):
    src = built["llama"][0]
    bad = {
        "arch": (["-a", "nosuch"], src, ["--arch nosuch", "llama", "gemma3"]),
        "field": ([], _broken(src, env / "no-hidden", _edit_config(hidden_size=None)), ["hidden_size"]),
        "config-arch": ([], _broken(src, env / "bert", _edit_config(architectures=["BertModel"])),
                        ["BertModel", "llama"]),
        "tensor": ([], _broken(src, env / "no-tensor", _edit_tensors(
            lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))), ["model.layers.1.mlp.down_proj.weight"]),
        "shape": ([], _broken(src, env / "bad-shape", _edit_tensors(
            lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}))),
                  ["model.layers.0.self_attn.q_proj.weight", "[32, 64]", "[64, 64]"]),
        "no-config": ([], _broken(src, env / "no-config", lambda d: (d / "config.json").unlink()), ["config.json"]),
        "no-dir": ([], env / "does-not-exist", ["does-not-exist", "no such local directory"]),
    }
    procs = {k: _cli("--prompt", "hi", "plain", "-m", str(d), *args) for k, (args, d, _) in bad.items()}
    for key, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 1, (key, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, (key, stderr)
        for part in bad[key][2]:
            assert part in lines[0], (key, part, lines[0])


def test_gemma3_multimodal_checkpoint_runs_its_text_model(env, built, refs):
    """Gemma3ForConditionalGeneration: text_config nests the config, weights sit under
    language_model.*, vision tensors are skipped; logits equal the text model's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = built["gemma3"][1]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    mm = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=500, boi_token_index=498, eoi_token_index=499)).eval()
    inner = {k[len("model."):]: v for k, v in text.state_dict().items() if k.startswith("model.")}
    mm.model.language_model.load_state_dict(inner)
    path = _save(mm, env / "gemma3-mm")
    loaded = load(PlainSpec(str(path)), LoadOptions(token_source="none"))
    assert loaded.config.model_type == "gemma3_text"
    ids, logits, greedy, _, _ = refs["gemma3"]
    got = _ours(loaded.model, loaded.config, ids, greedy)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, logits))
    print(f"gemma3 multimodal max |logit diff| {diff:.2e}")
    assert diff < F32_TOL
