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


# ---- -n/--num-device-layers: the first N layers wholly on the device ----

def _greedy_with(model, cache) -> tuple[list[int], list[torch.Tensor]]:
    n, tokens, logits = len(PROMPT), [], []
    with torch.inference_mode():
        last = model(torch.tensor(PROMPT), Batch(torch.arange(n), [SeqSlice(0, n, cache)]))[-1]
        for i in range(STEPS):
            logits.append(last)
            tokens.append(int(last.argmax()))
            last = model(torch.tensor([tokens[-1]]), Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)]))[-1]
    return tokens, logits


def _paged_cache(cfg, fragmented: bool):
    """A paged cache over 4-token blocks; fragmented: the sequence's blocks out of order, so every
    update goes through the slot-index gather instead of a slice of the pool."""
    from mistralrs_cli.engine.paged import PagedKV, PoolShape

    kv = PagedKV(PoolShape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32), 8, 4)
    cache = kv.new_sequence([])
    assert cache.reserve(len(PROMPT) + STEPS)
    if fragmented:
        cache.blocks = [6, 1, 4, 0, 3]
        assert not cache.contiguous
    return cache


CACHES = {
    "seq": lambda cfg: SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity=8),
    "paged": lambda cfg: _paged_cache(cfg, False),
    "paged-fragmented": lambda cfg: _paged_cache(cfg, True),
}


def _expected_transfers(n_device: int, n_layers: int) -> list[tuple[str, int, str]]:
    """Per forward: the hidden state in before layer 0 (then the positions, once) and out after layer
    N-1 (or the logits out when every layer, and so the head, is on the device); nothing at N=0."""
    if n_device == 0:
        return []
    out = ("logits", n_layers, "out") if n_device == n_layers else ("hidden", n_device, "out")
    return [("hidden", 0, "in"), ("positions", 0, "in"), out]


@pytest.mark.parametrize("n_device", [0, 1, 2])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K], ids=lambda q: q.name)
def test_device_layers_give_the_torch_backends_tokens(files, qtype, n_device):
    """-n 0, 1 and all (2): the same greedy tokens as the torch backend, with the CPU standing in
    for the device and the emulator launching the kernels; the hidden state crosses only at the
    boundary (counted), and the device layers' linears, norms and KV buffers are the device's."""
    model, cfg = load_gguf_model(GGUFFile(files[qtype]), numerics="exact")
    want, want_logits = _greedy(model, cfg)
    launcher = _Recording(emu_launcher(("forward",)))
    device = cb.CupyBackend(launcher)
    p = place_layers(cfg.num_hidden_layers, n_device)
    moved = assign_backends(model, p, device)
    on_device = [layer.self_attn.o_proj.backend is device for layer in model.model.layers]
    assert on_device == [i < n_device for i in range(cfg.num_hidden_layers)]
    assert (model.lm_head.backend is device) == (n_device == cfg.num_hidden_layers)
    assert moved >= 7 * n_device + (n_device == cfg.num_hidden_layers)
    got, got_logits = _greedy(model, cfg)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert bool(launcher.names) == (n_device > 0)
    per_forward = _expected_transfers(n_device, cfg.num_hidden_layers)
    assert model.device_run.transfers == per_forward * (1 + STEPS)


@pytest.mark.parametrize("kind", ["paged", "paged-fragmented"])
def test_device_layers_with_the_paged_cache(files, kind):
    """The engine's paged cache under -n 1: layer 0's pool moves to the device, and a fragmented
    sequence's slot gather runs with device indices; tokens as the torch backend's."""
    model, cfg = load_gguf_model(GGUFFile(files[Q.Q4_0]), numerics="exact")
    want, _ = _greedy_with(model, CACHES[kind](cfg))
    assign_backends(model, place_layers(cfg.num_hidden_layers, 1), cb.CupyBackend(emu_launcher(("forward",))))
    got, _ = _greedy_with(model, CACHES[kind](cfg))
    assert got == want


class _MetaLauncher:
    """A launcher on torch's meta device: kernels do nothing, arrays are the tensors themselves.
    Meta tensors refuse to mix with CPU tensors in an op and cannot be copied to the CPU, so a
    forward that finishes proves every op of a device layer ran on device tensors, and that no
    matmul copied its activations off the device and back."""

    device = "meta"

    def get_function(self, name):
        return lambda grid, block, args, shared_mem=0: None

    @staticmethod
    def array(t):
        return t

    @staticmethod
    def stream():
        from contextlib import nullcontext

        return nullcontext()


def _meta_run(model, cfg, n_device, cache):
    backend = cb.CupyBackend(_MetaLauncher())
    assign_backends(model, place_layers(cfg.num_hidden_layers, n_device, device="meta"), backend)
    run = model.device_run
    # meta data cannot come back: the CPU side of the boundary gets zeros of the right shape
    run.move = lambda t, d: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta and d.type == "cpu" else t.to(d)
    tokens, logits = _greedy_with(model, cache)
    assert all(not t.is_meta for t in logits)
    return run


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("n_device", [1, 2])
def test_device_layers_touch_only_device_tensors(files, n_device, kind):
    """The same placement with torch's meta device as the device: prefill and decode finish, the
    device layers' KV buffers are meta and the CPU layers' are not, and the transfers are the
    boundary's."""
    model, cfg = load_gguf_model(GGUFFile(files[Q.Q4_0]), numerics="exact")
    cache = CACHES[kind](cfg)
    run = _meta_run(model, cfg, n_device, cache)
    keys = cache.k if kind == "seq" else cache.kv.kv
    assert [t.is_meta for t in keys] == [i < n_device for i in range(cfg.num_hidden_layers)]
    assert run.transfers == _expected_transfers(n_device, cfg.num_hidden_layers) * (1 + STEPS)


def test_meta_check_catches_a_cpu_weight_in_a_device_layer(files, monkeypatch):
    """The meta check can fail: with a layer's norms left on the CPU the forward raises."""
    from mistralrs_cli.backends import placement

    model, cfg = load_gguf_model(GGUFFile(files[Q.Q4_0]), numerics="exact")
    monkeypatch.setattr(placement, "move_module", lambda module, device: None)
    with pytest.raises(RuntimeError, match="meta"):
        _meta_run(model, cfg, 1, CACHES["seq"](cfg))


def test_clamped_num_device_layers_warns_once(files, monkeypatch, caplog):
    """load() with -n 10 on a 2-layer model (GPU faked as in the test above): one warning line,
    every layer and the head on the device, and generation warns no more."""
    import logging

    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    hf = gb.tiny_llama(seed=0, hidden_size=256, intermediate_size=256)
    path = gb.write_gguf(files[Q.Q4_0].with_name("q4_0-vocab-clamp.gguf"), hf, gb.gguf_vocab(gb.train_tokenizer()), Q.Q4_0)
    real = cb.CupyBackend
    monkeypatch.setattr(cb, "resolve_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(cb, "CupyBackend", lambda: real(emu_launcher(("forward",))))
    with caplog.at_level(logging.WARNING):
        gpu = load(GGUFSpec(str(path)), LoadOptions(token_source="none", device="cuda", num_device_layers=10))
        _greedy(gpu.model, gpu.config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "--num-device-layers 10" in warnings[0] and "2 layers" in warnings[0]
    assert all(isinstance(layer.self_attn.o_proj.backend, real) for layer in gpu.model.model.layers)
    assert isinstance(gpu.model.lm_head.backend, real)
    assert gpu.model.device_run.placement.head == "cuda"


# ---- every architecture under -n 1 ----

ARCH_NAMES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "starcoder2",
              "phi2", "phi3"]


@pytest.fixture(scope="module")
def arch_files(tmp_path_factory):
    import tiny_models as tm

    d = tmp_path_factory.mktemp("cuda_archs")
    out = {name: gb.write_gguf(d / f"{name}.gguf", getattr(tm, f"tiny_{name}")(seed=0), None, Q.Q8_0)
           for name in ARCH_NAMES}
    out["phi3-longrope"] = gb.write_gguf(d / "phi3-longrope.gguf", tm.tiny_phi3(seed=0, longrope=True), None, Q.Q8_0)
    return out


def _steps(model, cfg, ids=(1, 5, 9, 2, 7), extra=(3, 8)):
    """Logits of a prompt and two decode steps, teacher-forced."""
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity=4)
    out, n = [], len(ids)
    with torch.inference_mode():
        out.append(model(torch.tensor(ids), Batch(torch.arange(n), [SeqSlice(0, n, cache)])))
        for i, t in enumerate(extra):
            out.append(model(torch.tensor([t]), Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)])))
    return out


@pytest.mark.parametrize("arch", ARCH_NAMES + ["phi3-longrope"])
def test_every_architecture_with_its_first_layer_on_the_device(arch_files, arch):
    """-n 1 on each architecture's tiny Q8_0 GGUF: with the emulator launching, the logits are
    the torch backend's; on the meta device the forward finishes (no CPU tensor in the device
    layer). Emulator only: Mixtral (its expert dispatch, torch.unique, has no meta kernel) and
    Phi-3 LongRope (it reads the largest position with .item(), which meta tensors cannot)."""
    model, cfg = load_gguf_model(GGUFFile(arch_files[arch]), numerics="exact")
    want = _steps(model, cfg)
    assign_backends(model, place_layers(cfg.num_hidden_layers, 1), cb.CupyBackend(emu_launcher(("forward",))))
    for a, b in zip(_steps(model, cfg), want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    if arch in ("mixtral", "phi3-longrope"):
        return
    model, cfg = load_gguf_model(GGUFFile(arch_files[arch]), numerics="exact")
    assign_backends(model, place_layers(cfg.num_hidden_layers, 1, device="meta"), cb.CupyBackend(_MetaLauncher()))
    model.device_run.move = lambda t, d: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta and d.type == "cpu" else t.to(d)
    assert all(not t.is_meta for t in _steps(model, cfg))
    assert model.device_run.transfers == _expected_transfers(1, cfg.num_hidden_layers) * 3
