"""Gemma, Gemma 2 and StarCoder2 from tiny random transformers models written to F32 GGUF files as
llama.cpp's converter writes them (12-token prefill, 8 cached decode steps, logits within 1e-4 of
transformers'); rope scaling types against transformers' ROPE_INIT_FUNCTIONS, and a tiny llama
with each scaling end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gguf_builder as gb
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.loaders.plain import plain_config
from mistralrs_cli.loaders.weights import build_model
from mistralrs_cli.models import ARCHITECTURES
from mistralrs_cli.models.layers import ROPE_INV_FREQ
from test_models_more import PROMPT, _ours, _reference

F32_TOL = 1e-4
# builder, seed (one whose greedy continuation is not a single repeated token: tied embeddings
# make that common), llama.cpp architecture = our model_type once loaded
BUILDERS = {
    "gemma": (gb.tiny_gemma, 23),
    "gemma2": (gb.tiny_gemma2, 17),
    "starcoder2": (gb.tiny_starcoder2, 8),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    workdir = tmp_path_factory.mktemp("arch2_models")
    out = {}
    for name, (build, seed) in BUILDERS.items():
        hf = build(seed)
        out[name] = (hf, gb.write_gguf(workdir / f"{name}-f32.gguf", hf, vocab=None))
    return out


def _max_diffs(model, cfg, hf) -> list[float]:
    want, greedy = _reference(hf)
    assert len(set(greedy)) > 1  # the seed gives a non-degenerate continuation
    got = _ours(model, cfg, greedy)
    return [float((g - w).abs().max()) for g, w in zip(got, want)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_f32_logits_match_transformers(models, name):
    hf, path = models[name]
    gf = GGUFFile(path)
    assert gf.architecture == name
    model, cfg = load_gguf_model(gf, numerics="exact")
    assert cfg.model_type == name
    diffs = _max_diffs(model, cfg, hf)
    print(f"{name} f32 max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < F32_TOL, diffs


def test_gemma2_config_from_gguf(models):
    """Soft caps, window and alternation come from the file; the window is shorter than the
    prompt and the caps bend the logits, so the logits test covers them."""
    hf, path = models["gemma2"]
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (1.5, 4.0)
    assert cfg.sliding_window == 8 < len(PROMPT)
    assert [a.self_attn.window for a in model.model.layers] == [8, None, 8, None]
    assert hf.config.layer_types == ["sliding_attention", "full_attention"] * 2


def test_starcoder2_layernorm_and_biases(models):
    _, path = models["starcoder2"]
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    layer = model.model.layers[0]
    assert abs(cfg.layer_norm_eps - 1e-5) < 1e-10 and cfg.sliding_window == 8  # stored as f32
    assert float(layer.input_layernorm.bias.abs().sum()) > 0
    assert float(model.model.norm.bias.abs().sum()) > 0
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.c_fc.bias is not None


# ---- rope scaling ----
HEAD_DIM, THETA, MAX_POS = 16, 50000.0, 64
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def _llama_config(scaling: dict, max_pos: int = MAX_POS):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                       rope_parameters={"rope_theta": THETA, **scaling})


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [MAX_POS, 3 * MAX_POS + 5])
def test_inv_freq_matches_transformers(name, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    kind = scaling["rope_type"]
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](_llama_config(scaling), "cpu", seq_len=seq_len)
    got, factor = ROPE_INV_FREQ[kind](HEAD_DIM, THETA, scaling, MAX_POS, seq_len)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-6
    assert abs(factor - (want_factor or 1.0)) < 1e-6


def test_unknown_rope_type_is_refused():
    from mistralrs_cli.models.layers import Rotary

    with pytest.raises(ValueError, match="longrope"):
        Rotary(16, THETA, {"rope_type": "longrope"})


@pytest.mark.parametrize("name", ["llama3", "yarn_mscale", "dynamic"])
def test_tiny_llama_with_rope_scaling_matches_transformers(name):
    """Through the plain config parser and the model builder; a max_position_embeddings of 8 makes
    dynamic NTK rescale on every step past the 8th position."""
    scaling = SCALINGS[name]
    hf = gb.tiny_llama(11, max_position_embeddings=8 if name == "dynamic" else MAX_POS,
                       rope_parameters={"rope_theta": THETA, **scaling})
    raw = hf.config.to_dict()
    cfg = plain_config(raw, "llama", Path("config.json"))
    assert cfg.rope_scaling["rope_type"] == scaling["rope_type"]
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model = build_model(ARCHITECTURES["llama"], cfg, weights, source="tiny")
    diffs = _max_diffs(model, cfg, hf)
    print(f"llama {name} max |logit diff| {max(diffs):.2e}")
    assert max(diffs) < F32_TOL, diffs


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_attention_bias_covers_o_proj(name):
    """config.json's attention_bias biases q, k, v and o in transformers' Llama and Qwen3."""
    hf = {"llama": gb.tiny_llama, "qwen3": gb.tiny_qwen3}[name](11, attention_bias=True)
    gen = torch.Generator().manual_seed(5)  # not the global RNG: other tests move its state
    with torch.no_grad():  # transformers zero-initialises biases: make them count
        for layer in hf.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.normal_(0.0, 0.5, generator=gen)
    cfg = plain_config(hf.config.to_dict(), name, Path("config.json"))
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    assert "model.layers.0.self_attn.o_proj.bias" in weights
    model = build_model(ARCHITECTURES[name], cfg, weights, source="tiny")
    assert max(_max_diffs(model, cfg, hf)) < F32_TOL


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_gguf_rope_scaling_matches_transformers(name, tmp_path):
    """Scaling as llama.cpp's converter writes it: rope.scaling.* keys (linear, YaRN with its
    original context and betas) or, for Llama 3, the rope_freqs tensor of per-frequency divisors."""
    scaling = {**SCALINGS[name], **({"beta_fast": 16.0, "beta_slow": 2.0} if name == "yarn" else {})}
    hf = gb.tiny_llama(11, max_position_embeddings=MAX_POS, rope_parameters={"rope_theta": THETA, **scaling})
    path = gb.write_gguf(tmp_path / f"{name}.gguf", hf, vocab=None)
    gf = GGUFFile(path)
    assert ("rope_freqs.weight" in gf.tensors) == (name == "llama3")
    model, cfg = load_gguf_model(gf, numerics="exact")
    diffs = _max_diffs(model, cfg, hf)
    print(f"gguf llama {name} max |logit diff| {max(diffs):.2e}")
    assert max(diffs) < F32_TOL, diffs


def test_gguf_unknown_rope_scaling_is_one_error(tmp_path):
    from mistralrs_cli.errors import UserError

    path = gb.write_gguf(tmp_path / "tiny.gguf", gb.tiny_llama(11), vocab=None,
                         extra_strings={"llama.rope.scaling.type": "su"})
    with pytest.raises(UserError, match=r"llama.rope.scaling.type is 'su'; supported: none, linear, yarn"):
        load_gguf_model(GGUFFile(path))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_config_json_path_matches_transformers(models, name):
    """The same models through config.json's fields (plain_config) and HF-named weights."""
    hf, _ = models[name]
    cfg = plain_config(hf.config.to_dict(), name, Path("config.json"))
    weights = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model = build_model(ARCHITECTURES[name], cfg, weights, source="tiny")
    assert max(_max_diffs(model, cfg, hf)) < F32_TOL
