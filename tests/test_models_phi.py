"""Phi-2 and Phi-3: tiny random transformers models written to F32 GGUF files as llama.cpp's
converter writes them (phi2: separate q/k/v with biases; phi3: fused attn_qkv and gate|up
ffn_up, LongRoPE factors as tensors); our logits (12-token prefill, then 8 cached decode steps)
equal transformers' within 1e-4. LongRoPE's tables also equal transformers' rope functions."""
from __future__ import annotations

import pytest
import torch

import gguf_builder as gb
import parity
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.models.layers import Batch, SeqSlice
from test_models_more import F32_TOL, PROMPT, STEPS, _ours, _reference

# name -> (builder, llama.cpp architecture, our model_type once loaded)
BUILDERS = {
    "phi2": (lambda: gb.tiny_phi2(5), "phi2", "phi"),
    "phi3": (lambda: gb.tiny_phi3(6), "phi3", "phi3"),
    "phi3-longrope": (lambda: gb.tiny_phi3(7, longrope=True), "phi3", "phi3"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("phi_models")
    out = {}
    for name, (build, *_) in BUILDERS.items():
        hf = build()
        out[name] = (hf, gb.write_gguf(workdir / f"{name}-f32.gguf", hf, vocab=None))
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_f32_logits_match_transformers(models, name):
    hf, path = models[name]
    parity.check_gguf_f32(hf, path, BUILDERS[name][1], BUILDERS[name][2], PROMPT, STEPS, F32_TOL)


def test_phi3_fused_tensors_keep_hf_names(models):
    _, path = models["phi3"]
    gf = GGUFFile(path)
    assert "blk.0.attn_qkv.weight" in gf.tensors and "blk.0.attn_q.weight" not in gf.tensors
    model, cfg = load_gguf_model(gf, numerics="exact")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert attn.qkv_proj.out_features == (h + 2 * kv) * d
    assert mlp.gate_up_proj.out_features == 2 * cfg.intermediate_size


def test_longrope_tables_equal_transformers(models):
    """inv_freq (short and long), the attention factor, cos and sin from the GGUF file equal
    transformers' ROPE_INIT_FUNCTIONS["longrope"] for the same config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, path = models["phi3-longrope"]
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    rot = model.model.layers[0].self_attn.rotary
    init = ROPE_INIT_FUNCTIONS["longrope"]
    short, factor = init(hf.config, "cpu")
    long, _ = init(hf.config, "cpu", seq_len=cfg.max_position_embeddings)
    assert torch.allclose(rot.short, short, rtol=1e-6) and torch.allclose(rot.long, long, rtol=1e-6)
    assert abs(rot.attn_factor - factor) < 1e-6 and factor > 1.0
    assert not torch.allclose(short, long)
    for positions, inv in ((torch.arange(12), short), (torch.arange(12, 20), long)):
        cos, sin, _ = rot.tables(Batch(positions, [SeqSlice(0, len(positions), None)]), torch.float32)
        emb = torch.cat([positions[:, None] * inv, positions[:, None] * inv], dim=-1)
        assert torch.allclose(cos[:, 0], emb.cos() * factor, atol=1e-6)
        assert torch.allclose(sin[:, 0], emb.sin() * factor, atol=1e-6)
    # and the 8 decode steps of the logits test cross the original 16-token context
    assert len(PROMPT) + 8 > rot.orig


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_phi2_fused_qkv_file(models, tmp_path, qtype):
    """Phi-2 GGUFs converted from the original Wqkv checkpoints carry one attn_qkv tensor (and
    bias): split at load into q/k/v, the result equals the separate-tensor file's weights."""
    from gguf import GGMLQuantizationType as Q

    hf, _ = models["phi2"]
    fused = GGUFFile(gb.write_gguf(tmp_path / "fused.gguf", hf, vocab=None, qtype=Q[qtype], fused_qkv=True))
    separate = GGUFFile(gb.write_gguf(tmp_path / "separate.gguf", hf, vocab=None, qtype=Q[qtype]))
    assert "blk.0.attn_qkv.weight" in fused.tensors and "blk.0.attn_q.weight" not in fused.tensors
    a, _ = load_gguf_model(fused, numerics="exact")
    b, _ = load_gguf_model(separate, numerics="exact")
    for x in "qkv":
        pa, pb = (getattr(m.model.layers[1].self_attn, f"{x}_proj") for m in (a, b))
        assert torch.equal(pa.qweight.dequantize(), pb.qweight.dequantize())
        assert torch.equal(pa.bias, pb.bias)
    if qtype == "F32":
        want, greedy = _reference(hf)
        got = _ours(a, a.config, greedy)
        assert max(float((g - w).abs().max()) for g, w in zip(got, want)) < 1e-4
