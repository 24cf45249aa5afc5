"""Q8_0 GGUF files of the tiny mistral, mixtral, qwen2, qwen3, gemma, gemma2, starcoder2, phi2 and
phi3 models (every 2-D weight has rows of whole 32-value blocks, so all of them are quantized, the
embeddings included). Our logits (12-token prefill, then 8 cached decode steps) are checked twice:
  * against transformers loading the same file (`from_pretrained(dir, gguf_file=...)`) within 1e-3,
    where transformers can build the architecture from it; metadata transformers does not read
    (but llama.cpp does) is passed as config overrides, each listed below with its reason;
  * for every architecture, against the original transformers model whose weights were replaced by
    gguf-py's own Q8_0 round trip, dequantize(quantize(w, Q8_0)), within 1e-4 (Q8_0 blocks run
    along rows, so llama.cpp's q/k row permutation and the gate|up / qkv splits commute with it).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import gguf_builder as gb
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from test_models_more import _ours, _reference

HF_GGUF_TOL, DEQUANT_TOL = 1e-3, 1e-4
BLOCK = 32
# name -> builder and seed (as in the F32 tests)
BUILDERS = {
    "mistral": (gb.tiny_mistral, 1), "mixtral": (gb.tiny_mixtral, 2), "qwen2": (gb.tiny_qwen2, 3),
    "qwen3": (gb.tiny_qwen3, 4), "gemma": (gb.tiny_gemma, 23), "gemma2": (gb.tiny_gemma2, 17),
    "starcoder2": (gb.tiny_starcoder2, 8), "phi2": (gb.tiny_phi2, 5), "phi3": (gb.tiny_phi3, 6),
}
# The files carry no tokenizer, so transformers cannot derive vocab_size: given for all.
HF_GGUF_OVERRIDES = {
    # transformers reads none of these GGUF keys and falls back to its config defaults
    "qwen3": {"head_dim": 32},  # qwen3.attention.key_length
    "gemma2": {"query_pre_attn_scalar": 32,  # llama.cpp: the query scale is head_dim
               "attn_logit_softcapping": 1.5, "final_logit_softcapping": 4.0},  # gemma2.*_softcapping
    "starcoder2": {"sliding_window": 8,  # starcoder2.attention.sliding_window
                   "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},  # starcoder2.rope.freq_base
    "phi3": {"pad_token_id": 1},  # the default 32000 is outside the 512-token vocab
}
# architectures transformers cannot load from these files, with the reason
HF_GGUF_UNSUPPORTED = {
    "mistral": "llama.cpp writes Mistral as GGUF architecture 'llama'; transformers builds a "
               "LlamaForCausalLM from it, which has no sliding window (the file's 8-token window "
               "is shorter than the 12-token prompt)",
    "mixtral": "llama.cpp writes Mixtral as GGUF architecture 'llama'; transformers builds a dense "
               "LlamaForCausalLM from it, which leaves the ffn_*_exps expert tensors unused",
    "gemma": "transformers' GGUF loader does not support architecture 'gemma'",
    "phi2": "transformers' GGUF loader does not support architecture 'phi2'",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (transformers model, its Q8_0 GGUF file); each file in its own directory, since
    from_pretrained(dir, gguf_file=...) reads the directory."""
    workdir = tmp_path_factory.mktemp("q8_models")
    out = {}
    for name, (build, seed) in BUILDERS.items():
        hf = build(seed)
        (workdir / name).mkdir()
        out[name] = (hf, gb.write_gguf(workdir / name / f"{name}-q8_0.gguf", hf, vocab=None, qtype=Q.Q8_0))
    return out


def _max_diffs(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    assert [g.shape for g in got] == [w.shape for w in want]
    return [float((g - w).abs().max()) for g, w in zip(got, want)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_matrix_is_q8_0(models, name):
    """The tiny shapes are Q8_0-compatible: no 2-D tensor fell back to F32."""
    hf, path = models[name]
    assert all(t.shape[-1] % BLOCK == 0 for t in hf.state_dict().values() if t.ndim >= 2)
    for info in GGUFFile(path).tensors.values():
        want = Q.Q8_0 if len([d for d in info.shape if d > 1]) >= 2 else Q.F32
        assert info.qtype == want, info.name


def _hf_q8_round_trip(hf: torch.nn.Module) -> torch.nn.Module:
    """A copy of `hf` whose matrices went through gguf-py's Q8_0 quantize and dequantize."""
    import copy

    out = copy.deepcopy(hf)
    with torch.no_grad():
        for _, p in out.named_parameters():
            if p.ndim >= 2:
                w = p.detach().float().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, Q.Q8_0), Q.Q8_0).reshape(w.shape)))
    return out.eval()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_q8_0_matches_transformers_on_gguf_py_dequantized_weights(models, name):
    hf, path = models[name]
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    want, greedy = _reference(_hf_q8_round_trip(hf))
    diffs = _max_diffs(_ours(model, cfg, greedy), want)
    print(f"{name} q8_0 vs transformers(dequantized) max |logit diff| prefill {diffs[0]:.2e}, "
          f"decode {max(diffs[1:]):.2e}")
    assert max(diffs) < DEQUANT_TOL, diffs
    # and the quantization is real: the F32 model's logits differ by more than the tolerance
    f32, _ = _reference(hf)
    assert max(_max_diffs(_ours(model, cfg, greedy)[:1], f32[:1])) > HF_GGUF_TOL


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_q8_0_matches_transformers_on_same_file(models, name):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM

    if name in HF_GGUF_UNSUPPORTED:
        pytest.skip(HF_GGUF_UNSUPPORTED[name])
    hf, path = models[name]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, vocab_size=gb.VOCAB,
                                                  **HF_GGUF_OVERRIDES.get(name, {})).eval()
    assert theirs.config.model_type == hf.config.model_type
    model, cfg = load_gguf_model(GGUFFile(path), numerics="exact")
    want, greedy = _reference(theirs)  # transformers' own KV cache
    diffs = _max_diffs(_ours(model, cfg, greedy), want)
    print(f"{name} q8_0 vs transformers-gguf max |logit diff| prefill {diffs[0]:.2e}, "
          f"decode {max(diffs[1:]):.2e}")
    assert max(diffs) < HF_GGUF_TOL, diffs
