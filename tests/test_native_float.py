"""The native runtime on F32 / F16 / BF16 GGUF files (backends/csrc/floatmm.c): f32 arithmetic on
the file's values, an f32 KV cache.

- kernel: against numpy in f64 on the same (widened) weights, in the native and the portable
  scalar build (the same bits); every activation row's outputs the same bits whatever rows share the call (the
  property a verify chunk relies on); the fused norm / gated activation / bias / post-norm /
  residual add against numpy.
- model: tiny llama, qwen2 (biases) and gemma3 (GELU, sandwich norms, sliding windows) written as
  F32, F16 and BF16 by tests/gguf_builder.py load as NativeModel; prompt and decode logits against
  transformers (its 2-D weights rounded to the file's type) and against the torch path on the same
  file, within 1e-4 of the logits' range; a file mixing float and quantized projections goes to
  the torch path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends import native
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions

FLOATS = [Q.F32, Q.F16, Q.BF16]
TORCH = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _weights(qtype: Q, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The file's bytes (rows x row bytes) and their values in f64 (torch widens them exactly)."""
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)).to(TORCH[qtype])
    raw = w.view(torch.uint8 if qtype == Q.F32 else torch.int16).numpy().view(np.uint8).reshape(n, -1)
    return np.ascontiguousarray(raw), w.double().numpy()


@pytest.mark.parametrize("qtype", FLOATS)
def test_products_match_numpy_and_rows_do_not_depend_on_their_neighbours(kernel_builds, qtype):
    n, k = 37, 203  # edge tiles of weight rows, a k % 8 tail
    raw, w = _weights(qtype, n, k, seed=1)
    x = np.random.default_rng(2).standard_normal((9, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.T
    outs = {}
    for name, lib in kernel_builds.items():
        plan = native.Plan([(raw, qtype, n)], lib)
        whole = native.qmatmul(x, plan, lib)
        assert np.abs(whole - want).max() < 1e-4 * np.abs(want).max(), name
        for i in range(9):  # alone, and inside a pair, a triple, the whole: the same bits
            assert np.array_equal(native.qmatmul(x[i:i + 1], plan, lib), whole[i:i + 1]), (name, i)
        for a, b in ((2, 4), (3, 6), (1, 9)):
            assert np.array_equal(native.qmatmul(x[a:b], plan, lib), whole[a:b]), (name, a, b)
        outs[name] = whole
    # the scalar build fuses each product as the vector build's FMAs do, sums lanes in its order
    assert all(np.array_equal(y, outs["native"]) for y in outs.values())


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("act", [1, 2])
def test_fused_prologue_and_epilogue_match_numpy(kernel_builds, act):
    """act(gate) * up then an RMSNorm before; bias, post-norm and the residual add after; two
    stacked parts of different types."""
    k, rng = 64, np.random.default_rng(3)
    (r1, w1), (r2, w2) = _weights(Q.F16, 24, k, seed=4), _weights(Q.F32, 16, k, seed=5)
    x = rng.standard_normal((5, 2 * k)).astype(np.float32)
    norm, post = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32), (1 + 0.1 * rng.standard_normal(40)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    g, up = x[:, :k].astype(np.float64), x[:, k:].astype(np.float64)
    a = g / (1 + np.exp(-g)) if act == 1 else 0.5 * g * (1 + np.tanh(0.7978845608028654 * (g + 0.044715 * g ** 3)))
    y = _rms(a * up, norm, 1e-5) @ np.concatenate([w1, w2]).T + bias
    start = rng.standard_normal((5, 40)).astype(np.float32)
    want = start + _rms(y, post, 1e-6)
    for name, lib in kernel_builds.items():
        plan = native.Plan.join([native.Plan([(r1, Q.F16, 24)], lib), native.Plan([(r2, Q.F32, 16)], lib)])
        opts = native.qmm_opts(norm, 1e-5, act=act, bias=bias, post=post, post_eps=1e-6)
        res = start.copy()
        opts.residual, opts.ld_res = res.ctypes.data, 40
        native.qmatmul(x, plan, lib, opts, out=np.empty((5, 40), np.float32))
        assert np.abs(res - want).max() < 1e-5 * np.abs(want).max(), name


@pytest.fixture(scope="module")
def vocab():
    return gb.gguf_vocab(gb.train_tokenizer())


MODELS = {"llama": lambda: gb.tiny_llama(1), "qwen2": lambda: gb.tiny_qwen2(1), "gemma3": lambda: gb.tiny_gemma3(1)}


def _steps(model, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Logits of every prompt row, then of n greedy cached steps; and the greedy tokens."""
    cache = cache_for(model)
    out = [np.asarray(model.step(prompt, list(range(len(prompt))), [SeqSlice(0, len(prompt), cache)],
                                 list(range(len(prompt)))))]
    toks = []
    for pos in range(len(prompt), len(prompt) + n):
        toks.append(int(out[-1][-1].argmax()))
        out.append(np.asarray(model.step([toks[-1]], [pos], [SeqSlice(0, 1, cache)], [0])))
    return np.concatenate(out), toks


@pytest.mark.parametrize("qtype", FLOATS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_logits_match_transformers_and_the_torch_path(tmp_path, vocab, arch, qtype):
    hf = MODELS[arch]()
    path = gb.write_gguf(tmp_path / f"{arch}.gguf", hf, vocab=vocab, qtype=qtype)
    opts = LoadOptions(token_source="none")
    ours = load(GGUFSpec(str(path)), opts).model
    assert isinstance(ours, NativeModel) and ours.cache_dtype == np.float32
    prompt = list(range(3, 40, 2))  # 19 tokens: past gemma3's sliding window of 8
    got, toks = _steps(ours, prompt, 6)
    with torch.inference_mode():
        via_torch, torch_toks = _steps(load(GGUFSpec(str(path)), LoadOptions(token_source="none", runtime="torch")).model,
                                       prompt, 6)
        for p in hf.parameters():  # the file's values: 2-D weights in its type, norms in F32
            if p.ndim == 2:
                p.data = p.data.to(TORCH[qtype]).float()
        want = hf(torch.tensor([prompt + toks])).logits[0].numpy()
    scale = np.abs(want).max()
    assert toks == torch_toks
    assert np.abs(got - want).max() < 1e-4 * scale
    assert np.abs(got - np.asarray(via_torch)).max() < 1e-4 * scale


def test_a_verify_chunk_equals_decode_steps(tmp_path, vocab):
    """Rows scored together (a speculative verify chunk) give the logits single steps give, bit for bit."""
    path = gb.write_gguf(tmp_path / "llama.gguf", gb.tiny_llama(2), vocab=vocab, qtype=Q.F16)
    model = load(GGUFSpec(str(path)), LoadOptions(token_source="none")).model
    prompt, more = list(range(5, 25)), [7, 9, 11, 13, 15, 17]
    c1, c2 = cache_for(model), cache_for(model)
    model.step(prompt, list(range(20)), [SeqSlice(0, 20, c1)], [19])
    chunk = model.step(more, list(range(20, 26)), [SeqSlice(0, 6, c1)], list(range(6)))
    model.step(prompt, list(range(20)), [SeqSlice(0, 20, c2)], [19])
    single = [model.step([t], [20 + i], [SeqSlice(0, 1, c2)], [0])[0] for i, t in enumerate(more)]
    assert np.array_equal(chunk, np.stack(single))


def test_a_file_mixing_float_and_quantized_projections_loads_as_a_torch_model(tmp_path, vocab):
    hf = gb.tiny_llama(3)
    mixed = {n: Q.Q8_0 for n, w in gb.gguf_tensors(hf).items() if ".attn_k." in n}
    path = gb.write_gguf(tmp_path / "mixed.gguf", hf, vocab=vocab, qtype=Q.F16, tensor_types=mixed)
    assert not isinstance(load(GGUFSpec(str(path)), LoadOptions(token_source="none")).model, NativeModel)
