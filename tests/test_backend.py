"""The torch backend's pieces against independent references: gguf-py's Q8_0 quantizer for the
the fast path's activation rounding (llama.cpp's), the exact dequantized matmul for the int4 and f16 paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralrs_cli.backends.torch_backend import TorchBackend, _q8_0, _q8_k
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.quant import int4pack
from mistralrs_cli.quant.dequant import dequantize
from mistralrs_cli.quant.qweight import QWeight


def test_q8_0_activation_rounding_matches_gguf_quantizer():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 576)) * rng.uniform(0.01, 30, (64, 1))).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero block
    ref = quants.dequantize(quants.quantize(x, Q.Q8_0), Q.Q8_0)
    ours = _q8_0(torch.from_numpy(x)).numpy()
    step = np.abs(x).reshape(-1, 32).max(-1).repeat(32).reshape(x.shape) / 127
    # gguf-py multiplies by 1/d and rounds half away from zero, llama.cpp's SIMD path by 127/amax
    # and half to even: the codes may differ by one on rare ties, nothing more
    assert np.mean(ours == ref) > 0.999
    assert np.all(np.abs(ours - ref) <= step * 1.01)


def test_q8_k_rounding_uses_signed_max_and_f32_scale():
    x = torch.tensor([[-4.0] + [1.0] * 255])  # the extreme is negative: -4 -> -127 exactly
    r = _q8_k(x)
    assert r[0, 0].item() == -4.0
    assert torch.allclose(r[0, 1:], torch.full((255,), round(127 / 4) * 4 / 127))
    assert torch.equal(_q8_k(torch.zeros(1, 256)), torch.zeros(1, 256))


@pytest.mark.parametrize("name", ["blk.0.ffn_gate.weight", "blk.3.attn_q.weight"])
def test_int4_path_close_to_exact(smollm2_path, name):
    gf = GGUFFile(smollm2_path)
    info = gf.tensors[name]
    w = dequantize(gf.raw(name), info.qtype)
    packed, sz = int4pack.pack([(gf.raw(name), info.qtype)], w.shape[1])
    x = torch.randn(5, w.shape[1])
    ref, got = x @ w.T, int4pack.matmul(x, packed, sz)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 activations and scales


def test_q4_k_int4_form(gemma3_path):
    gf = GGUFFile(gemma3_path)
    name = next(n for n, t in gf.tensors.items() if t.qtype == Q.Q4_K)
    w = dequantize(gf.raw(name), Q.Q4_K)
    packed, sz = int4pack.pack([(gf.raw(name), Q.Q4_K)], w.shape[1])
    x = torch.randn(3, w.shape[1])
    ref = x @ w.T
    assert ((int4pack.matmul(x, packed, sz) - ref).abs().max() / ref.abs().max()) < 1e-2


def test_f16_compute_form_close_to_exact_and_consistent_across_batch_sizes(smollm2_path):
    gf = GGUFFile(smollm2_path)
    qw = QWeight(gf.raw("blk.0.ffn_up.weight"), Q.Q4_1, (1536, 576))
    exact = TorchBackend("exact")
    fast = TorchBackend("fast")
    x = torch.randn(12, 576)
    ref = exact.qmatmul(x, qw)
    assert torch.allclose(ref, x @ qw.dequantize().T, atol=1e-5)
    for rows in (12, 2):  # a prefill chunk (weights widened to f32) and a decode (f16 GEMV)
        xr = x[:rows]
        got = fast.qmatmul(xr, qw)  # x is rounded to q8 blocks first: compare with that input
        ref = _q8_0(xr) @ qw.dequantize().T
        assert (got - ref).abs().max() / ref.abs().max() < 1e-3  # f16 weights (and output)
