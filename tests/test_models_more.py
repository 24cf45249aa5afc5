"""Mistral, Mixtral, Qwen2 and Qwen3: tiny random transformers models written to F32 GGUF files
as llama.cpp's converter writes them; our logits (12-token prefill, then 8 cached decode steps)
equal transformers' within 1e-4, and Mixtral's router picks transformers' experts for every token."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gguf_builder as gb
import parity
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile

PROMPT = [0, 17, 301, 44, 260, 9, 388, 123, 77, 500, 256, 31]  # BOS + 11 tokens
STEPS = 8
F32_TOL = 1e-4
# builder, seed, llama.cpp architecture, our model_type once loaded
BUILDERS = {
    "mistral": (gb.tiny_mistral, 1, "llama", "llama"),
    "mixtral": (gb.tiny_mixtral, 2, "llama", "mixtral"),
    "qwen2": (gb.tiny_qwen2, 3, "qwen2", "qwen2"),
    "qwen3": (gb.tiny_qwen3, 4, "qwen3", "qwen3"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (transformers model, its F32 GGUF file)."""
    workdir = tmp_path_factory.mktemp("more_models")
    out = {}
    for name, (build, seed, *_) in BUILDERS.items():
        hf = build(seed)
        out[name] = (hf, gb.write_gguf(workdir / f"{name}-f32.gguf", hf, vocab=None))
    return out


def _reference(hf: torch.nn.Module) -> tuple[list[torch.Tensor], list[int]]:
    logits, greedy, _ = parity.hf_steps(hf, PROMPT, STEPS)
    return logits, greedy


def _ours(model: torch.nn.Module, cfg, greedy: list[int]) -> list[torch.Tensor]:
    return parity.our_steps(model, cfg, PROMPT, greedy)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_f32_logits_match_transformers(models, name):
    hf, path = models[name]
    parity.check_gguf_f32(hf, path, BUILDERS[name][2], BUILDERS[name][3], PROMPT, STEPS, F32_TOL)


def test_mistral_window_slides(models):
    """The window is read from the file and is shorter than the prompt, so the logits test
    covers sliding; without the window the logits differ by whole units."""
    _, path = models["mistral"]
    _, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    assert cfg.sliding_window == 8 < len(PROMPT)


def test_mixtral_routes_to_transformers_experts(models):
    hf, path = models["mixtral"]
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (4, 2)
    routes = parity.mixtral_routes(model, hf, PROMPT, cfg.num_experts_per_tok)
    assert len(routes) == cfg.num_hidden_layers
    for layer, (picked, want) in enumerate(routes):
        assert torch.equal(picked, want), layer
        # and routing is not trivial: tokens go to different experts
        assert len({tuple(r) for r in picked.tolist()}) > 1


def test_mixtral_q8_0_experts_split_by_whole_blocks(models, tmp_path):
    """Quantized stacked experts: each expert's weight is its slice of the 3-D tensor, decoded
    by gguf-py as a whole."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    hf, _ = models["mixtral"]
    path = gb.write_gguf(tmp_path / "mixtral-q8_0.gguf", hf, vocab=None, qtype=Q.Q8_0)
    gf = GGUFFile(path)
    model, cfg = load_gguf_model(gf, numerics="exact")
    for gguf_name, w in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
        info = gf.tensors[f"blk.1.{gguf_name}.weight"]
        assert info.qtype == Q.Q8_0 and info.shape[0] == cfg.num_local_experts
        want = torch.from_numpy(dequantize(gf.raw(info.name).numpy(), Q.Q8_0).reshape(info.shape))
        for e, expert in enumerate(model.model.layers[1].block_sparse_moe.experts):
            assert torch.equal(getattr(expert, w).qweight.dequantize(), want[e])


def test_qwen_window_only_when_enabled():
    """Hub Qwen configs carry sliding_window with use_sliding_window false: no window then."""
    from mistralrs_cli.models.config import ModelConfig
    from mistralrs_cli.models.qwen2 import qwen_window_config

    hub = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1, sliding_window=32768, max_window_layers=2)
    off = qwen_window_config(ModelConfig.from_dict({**hub, "use_sliding_window": False}))
    assert [off.window(i) for i in range(4)] == [None] * 4
    on = qwen_window_config(ModelConfig.from_dict({**hub, "use_sliding_window": True}))
    assert [on.window(i) for i in range(4)] == [None, None, 32768, 32768]


def test_mixtral_per_expert_tensors(models, tmp_path):
    """Files from older converters: one tensor per expert (blk.N.ffn_gate.E.weight)."""
    hf, _ = models["mixtral"]
    path = gb.write_gguf(tmp_path / "mixtral-per-expert.gguf", hf, vocab=None, per_expert=True)
    gf = GGUFFile(path)
    assert "blk.0.ffn_gate.3.weight" in gf.tensors and "blk.0.ffn_gate_exps.weight" not in gf.tensors
    model, cfg = load_gguf_model(gf, numerics="exact")
    want, greedy = _reference(hf)
    got = _ours(model, cfg, greedy)
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) < F32_TOL
