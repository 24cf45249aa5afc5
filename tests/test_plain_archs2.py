"""`plain` with Gemma, Gemma 2, StarCoder2, Phi-2 and Phi-3 (also with LongRoPE): tiny random
transformers models saved with save_pretrained (transformers 5's `rope_parameters`/`dtype`) and
rewritten in the hub spelling (top-level rope_theta / partial_rotary_factor / rope_scaling,
torch_dtype, no layer_types). Our logits (12-token prefill, 8 cached decode steps) equal
transformers' within 1e-4, and for two of them greedy text through the CLI and the Python API
equals transformers' greedy tokens decoded by our tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gguf_builder as gb
import parity
from mistralrs_cli.loaders.plain import load_plain_model
from mistralrs_cli.types import LoadOptions, PlainSpec

PROMPT_IDS = [0, 17, 301, 44, 260, 9, 388, 123, 77, 500, 256, 31]  # BOS + 11 tokens
PROMPT = "The quick brown fox jumps over the lazy dog!"  # 12 tokens with BOS
STEPS = 8
F32_TOL = 1e-4
MIN_MARGIN = 1e-3

# name -> tiny model builder (seeds chosen so that greedy continuations do not tie)
MODELS = {
    "gemma": lambda: gb.tiny_gemma(3),
    "gemma2": lambda: gb.tiny_gemma2(2),
    "starcoder2": lambda: gb.tiny_starcoder2(8),
    "phi": lambda: gb.tiny_phi2(8),
    "phi3": lambda: gb.tiny_phi3(3),
    "phi3-longrope": lambda: gb.tiny_phi3(11, longrope=True),
}
# greedy text through the CLI and the API; 12 + 8 positions take LongRoPE past its original 16
TEXT_MODELS = ("gemma", "phi", "phi3-longrope")  # greedy text through the CLI and the API


def _hub_config(path: Path) -> None:
    """config.json as hub checkpoints spell it: rope_theta, partial_rotary_factor (when not 1)
    and rope_scaling (LongRoPE: type + factors) at top level, torch_dtype, no layer_types."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {"type": rope["rope_type"], "short_factor": rope["short_factor"],
                               "long_factor": rope["long_factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").unlink(missing_ok=True)


def _save(hf: torch.nn.Module, path: Path, hub: bool) -> Path:
    hf.save_pretrained(path)
    gb.train_tokenizer().save(str(path / "tokenizer.json"))
    tok_cfg = {"bos_token": gb.BOS, "eos_token": gb.EOS, "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if hub:
        _hub_config(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint dir, transformers model); `<arch>-hub` shares `<arch>`'s weights."""
    root = tmp_path_factory.mktemp("plain_archs2")
    out = {}
    for name, make in MODELS.items():
        hf = make()
        out[name] = (_save(hf, root / name, hub=False), hf)
        out[f"{name}-hub"] = (_save(hf, root / f"{name}-hub", hub=True), hf)
    return out


def _reference(hf: torch.nn.Module, ids: list[int]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    return parity.hf_steps(hf, ids, STEPS)


@pytest.fixture(scope="module")
def refs(built):
    return {name: _reference(hf, PROMPT_IDS) for name, (_, hf) in built.items() if not name.endswith("-hub")}


def _load(path: Path):
    return load_plain_model(PlainSpec(str(path)), LoadOptions(token_source="none"), path)


def _ours(model, cfg, ids: list[int], greedy: list[int]) -> list[torch.Tensor]:
    return parity.our_steps(model, cfg, ids, greedy)


NAMES = [n for base in MODELS for n in (base, f"{base}-hub")]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, built, refs):
    path, _ = built[name]
    base = name.removesuffix("-hub")
    model, cfg = _load(path)
    assert cfg.model_type == base.split("-")[0]
    want, greedy, _ = refs[base]
    got = _ours(model, cfg, PROMPT_IDS, greedy)
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    print(f"{name} max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < F32_TOL, diffs
    assert len(set(greedy)) > 1  # a non-degenerate continuation


def test_configs_are_what_they_claim(built):
    for name in NAMES:
        cfg = json.loads((built[name][0] / "config.json").read_text())
        if name.endswith("-hub"):
            assert "rope_theta" in cfg and "torch_dtype" in cfg and "rope_parameters" not in cfg
            assert "layer_types" not in cfg and "dtype" not in cfg
        else:
            assert "rope_parameters" in cfg and "rope_theta" not in cfg
    hub = lambda n: json.loads((built[n][0] / "config.json").read_text())  # noqa: E731
    assert hub("phi-hub")["partial_rotary_factor"] == 0.5
    assert hub("phi3-longrope-hub")["rope_scaling"]["type"] == "longrope"
    assert hub("starcoder2-hub")["norm_epsilon"] == 1e-5
    assert hub("gemma2-hub")["final_logit_softcapping"] == 4.0


def test_config_fields_are_read(built):
    """The fields that differ between spellings land in the same places."""
    for base in MODELS:
        a, b = _load(built[base][0])[1], _load(built[f"{base}-hub"][0])[1]
        assert (a.rope_theta, a.partial_rotary_factor) == (b.rope_theta, b.partial_rotary_factor), base
        sa, sb = a.rope_scaling or {}, b.rope_scaling or {}
        assert sa.get("type") == sb.get("type") and sa.get("long_factor") == sb.get("long_factor"), base
    phi = _load(built["phi-hub"][0])[1]
    assert phi.partial_rotary_factor == 0.5 and phi.layer_norm_eps == 1e-5
    g2, _ = _load(built["gemma2-hub"][0])
    windows = [layer.self_attn.window for layer in g2.model.layers]
    assert windows == [8, None, 8, None]
    lr = _load(built["phi3-longrope-hub"][0])[1]
    assert lr.rope_scaling["type"] == "longrope" and len(lr.rope_scaling["long_factor"]) == 8


def test_cli_and_api_greedy_match_transformers(built, tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRALRS_CLI_CACHE", str(tmp_path / "cache"))
    parity.check_cli_and_api_text({n: built[n] for n in TEXT_MODELS}, PROMPT, STEPS, MIN_MARGIN)
