"""End to end through the CUDA backend's code path on the CPU: a tiny llama (hidden 256: the
smallest row a K-quant block fits) written as a Q4_0 and
as a Q4_K GGUF file, loaded by the project's loader, generates greedily with the torch backend
(exact numerics) and then with every quantized linear switched to the CuPy backend over the
emulator launcher: the same tokens, and logits within f32 rounding. The prompt is 12 tokens, so
prefill runs the tiled GEMM and each decode step the GEMV."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from cuda_emu.fixtures import emu_launcher, random_qweight
from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.backends.placement import assign_backends, place_layers
from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.models.layers import Batch, SeqSlice
from mistralrs_cli.quant.qweight import QLinear

PROMPT = [0, 17, 93, 250, 4, 381, 66, 129, 7, 402, 311, 58]
STEPS = 6


def _k_blocks(shape, qtype, seed=0):
    """K-quant blocks with small finite scales (gguf-py cannot quantize to Q4_K; the builder's
    fully random bytes could put inf or NaN in a scale)."""
    rows = int(np.prod(shape[:-1]))
    return random_qweight(qtype, rows, shape[-1], seed).raw.numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_e2e")
    hf = gb.tiny_llama(seed=0, hidden_size=256, intermediate_size=256)  # K-quant rows are 256 wide
    out = {Q.Q4_0: gb.write_gguf(d / "q4_0.gguf", hf, None, Q.Q4_0)}
    names = [n for n, w in gb.gguf_tensors(hf).items() if w.ndim == 2 and n != "token_embd.weight"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gb, "random_blocks", _k_blocks)
        out[Q.Q4_K] = gb.write_gguf(d / "q4_k.gguf", hf, None, Q.F32, tensor_types=dict.fromkeys(names, Q.Q4_K))
    return out


def _greedy(model, cfg) -> tuple[list[int], list[torch.Tensor]]:
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    n, tokens, logits = len(PROMPT), [], []
    with torch.inference_mode():
        last = model(torch.tensor(PROMPT), Batch(torch.arange(n), [SeqSlice(0, n, cache)]))[-1]
        for i in range(STEPS):
            logits.append(last)
            tokens.append(int(last.argmax()))
            last = model(torch.tensor([tokens[-1]]), Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)]))[-1]
    return tokens, logits


class _Recording:
    """The emulator launcher, noting which kernels were fetched."""

    def __init__(self, inner):
        self.inner, self.names, self.device = inner, set(), inner.device
        self.array, self.stream = inner.array, inner.stream

    def get_function(self, name):
        self.names.add(name)
        return self.inner.get_function(name)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K], ids=lambda q: q.name)
def test_greedy_tokens_equal_torch_backend(files, qtype):
    model, cfg = load_gguf_model(GGUFFile(files[qtype]), numerics="exact")
    types = {m.qweight.qtype for m in model.modules() if isinstance(m, QLinear)}
    assert qtype in types
    want, want_logits = _greedy(model, cfg)
    launcher = _Recording(emu_launcher(("forward",)))
    swapped = cb.use_backend(model, cb.CupyBackend(launcher))
    assert swapped >= 2 * 7 + 1  # every projection of both layers and the LM head
    got, got_logits = _greedy(model, cfg)
    assert got == want
    assert {cb.kernel_name("gemm", qtype), cb.kernel_name("gemv", qtype)} <= launcher.names
    for a, b in zip(got_logits, want_logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_first_layer_on_the_device_backend(files):
    """-n 1: layer 0's projections on the CuPy backend (emulated), layer 1 and the head on torch;
    the same greedy tokens as all-torch."""
    model, cfg = load_gguf_model(GGUFFile(files[Q.Q4_0]), numerics="exact")
    want, _ = _greedy(model, cfg)
    device = cb.CupyBackend(emu_launcher(("forward",)))
    placement = place_layers(cfg.num_hidden_layers, 1)
    assert assign_backends(model, placement, device) >= 7
    layer0, layer1 = model.model.layers
    assert layer0.self_attn.o_proj.backend is device and layer1.self_attn.o_proj.backend is not device
    assert model.lm_head.backend is not device
    got, _ = _greedy(model, cfg)
    assert got == want


def test_load_places_layers_as_the_flags_say(files, monkeypatch):
    """The user's path: load() with --device cuda -n 1 (GPU faked: resolve_device says cuda, the
    backend runs on the emulator) puts layer 0 on the CuPy backend, uses exact numerics and no
    CPU executor, and generates what the CPU path with exact numerics generates."""
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    hf = gb.tiny_llama(seed=0, hidden_size=256, intermediate_size=256)
    path = gb.write_gguf(files[Q.Q4_0].with_name("q4_0-vocab.gguf"), hf, gb.gguf_vocab(gb.train_tokenizer()), Q.Q4_0)
    cpu = load(GGUFSpec(str(path)), LoadOptions(token_source="none", device="cpu", numerics="exact"))
    want, _ = _greedy(cpu.model, cpu.config)
    real = cb.CupyBackend
    monkeypatch.setattr(cb, "resolve_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(cb, "CupyBackend", lambda: real(emu_launcher(("forward",))))
    gpu = load(GGUFSpec(str(path)), LoadOptions(token_source="none", device="cuda", num_device_layers=1))
    layer0, layer1 = gpu.model.model.layers
    assert isinstance(layer0.self_attn.o_proj.backend, real) and not isinstance(layer1.self_attn.o_proj.backend, real)
    assert gpu.model.native is None and layer1.self_attn.o_proj.backend.numerics == "exact"
    got, _ = _greedy(gpu.model, gpu.config)
    assert got == want
