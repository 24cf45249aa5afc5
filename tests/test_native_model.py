"""The torch-free native runtime (backends/native_model.py) against the torch models.

Its reference is the torch GGUF model that the other tests hold to transformers and llama.cpp
(`LoadOptions(runtime="torch")`, with its own NativeDecoder, and the module path). Both multiply
through the same C kernels with the same 8-bit activation rounding (and the same f16 cache values,
stored as f16 here and as f32 there), so logits agree to float noise (rotary tables come from
numpy here, from torch there); the bound allows for a few values landing on the other side of a
rounding boundary. Also: which files fall back to torch, the rotary
frequencies against transformers, and that a whole CLI run never imports torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import Batch, SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions

THETA, MAX_POS = 10000.0, 64
CASES = {
    "llama-q8_0": (lambda: gb.tiny_llama(1), Q.Q8_0),
    "llama-tied-q4_0": (lambda: gb.tiny_llama(2, tie_word_embeddings=True), Q.Q4_0),
    "llama-q4_1": (lambda: gb.tiny_llama(3), Q.Q4_1),
    "llama-q5_1": (lambda: gb.tiny_llama(9), Q.Q5_1),
    "mistral-q8_0": (lambda: gb.tiny_mistral(1, sliding_window=5), Q.Q8_0),
    "qwen2-q8_0": (lambda: gb.tiny_qwen2(1), Q.Q8_0),
    "qwen3-q8_0": (lambda: gb.tiny_qwen3(1), Q.Q8_0),
    "gemma-q8_0": (lambda: gb.tiny_gemma(1), Q.Q8_0),
    "gemma2-q8_0": (lambda: gb.tiny_gemma2(2), Q.Q8_0),
    "gemma3-q8_0": (lambda: gb.tiny_gemma3(1), Q.Q8_0),
    "llama256-q4_k": (lambda: gb.tiny_llama(4, hidden_size=256, intermediate_size=512), Q.Q4_K),
    "llama256-q6_k": (lambda: gb.tiny_llama(5, hidden_size=256, intermediate_size=512), Q.Q6_K),
    "llama-linear-rope": (lambda: gb.tiny_llama(6, max_position_embeddings=MAX_POS, rope_parameters={
        "rope_theta": THETA, "rope_type": "linear", "factor": 4.0}), Q.Q8_0),
    "llama-llama3-rope": (lambda: gb.tiny_llama(7, max_position_embeddings=MAX_POS, rope_parameters={
        "rope_theta": THETA, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), Q.Q8_0),
    "llama-yarn-rope": (lambda: gb.tiny_llama(8, max_position_embeddings=MAX_POS, rope_parameters={
        "rope_theta": THETA, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 16.0, "beta_slow": 2.0}), Q.Q8_0),
}


def _write(path, make, qtype, vocab):
    hf = make()
    types = None
    if qtype in (Q.Q4_K, Q.Q6_K):  # gguf-py cannot quantize K types: real scales, random codes
        types = {n: qtype for n, w in gb.gguf_tensors(hf).items() if w.ndim == 2 and w.shape[-1] % 256 == 0}
    return gb.write_gguf(path, hf, vocab=vocab, qtype=qtype if types is None else Q.F32, tensor_types=types)


@pytest.fixture(scope="module")
def vocab():
    return gb.gguf_vocab(gb.train_tokenizer())


@pytest.fixture(scope="module")
def files(tmp_path_factory, vocab):
    d = tmp_path_factory.mktemp("native_model")
    return {name: _write(d / f"{name}.gguf", make, qtype, vocab) for name, (make, qtype) in CASES.items()}


def _load(path, **opts):
    return load(GGUFSpec(str(path)), LoadOptions(token_source="none", **opts)).model


def _steps(model, prompt: list[int], n: int, chunk: int | None = None) -> list[np.ndarray]:
    """Logits of the prompt's last row (prefilled in chunks of `chunk`), then of n greedy cached steps."""
    cache = cache_for(model)
    chunk = chunk or len(prompt)
    for start in range(0, len(prompt), chunk):
        ids = prompt[start:start + chunk]
        with torch.inference_mode():
            out = model(torch.tensor(ids), Batch(torch.arange(start, start + len(ids)), [SeqSlice(0, len(ids), cache)]))
    outs = [np.asarray(out[-1], dtype=np.float32)]
    pos = len(prompt)
    for _ in range(n):
        tok = int(outs[-1].argmax())
        with torch.inference_mode():
            out = model(torch.tensor([tok]), Batch(torch.tensor([pos]), [SeqSlice(0, 1, cache)]))
        outs.append(np.asarray(out[-1], dtype=np.float32))
        pos += 1
    return outs


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(got, want):
        worst = max(worst, float(np.abs(x - y).max()) / float(np.abs(y).max()))
        assert int(x.argmax()) == int(y.argmax())
    return worst


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_model_matches_the_torch_model(files, name):
    native = _load(files[name])
    assert isinstance(native, NativeModel), "the native runtime should take this file"
    torch_model = _load(files[name], runtime="torch")
    assert not isinstance(torch_model, NativeModel)
    prompt = list(range(3, 40, 2))  # 19 tokens: past the sliding windows of the windowed cases
    want = _steps(torch_model, prompt, 6)
    worst = _close(_steps(native, prompt, 6), want)
    print(f"{name}: max |Δlogit| / max |logit| = {worst:.1e}")
    # numpy's and torch's cos/sin differ by an ulp at some positions: when that moves an
    # activation across an 8-bit rounding boundary the logits move by ~1e-3 of their range
    assert worst < 1e-2
    # chunked prefill gives the same logits as one chunk (attention is per row)
    assert _close(_steps(native, prompt, 2, chunk=5), want[:3]) < 1e-2


def test_sequences_in_one_batch_equal_each_alone(files):
    model = _load(files["gemma3-q8_0"])
    a, b = list(range(5, 25)), list(range(30, 39))
    ca, cb = cache_for(model), cache_for(model)
    model(np.array(b), Batch(np.arange(9), [SeqSlice(0, 9, cb)]))
    both = model(np.array(a + [7]), Batch(np.array(list(range(20)) + [9]), [SeqSlice(0, 20, ca), SeqSlice(20, 21, cb)]))
    ca2, cb2 = cache_for(model), cache_for(model)
    alone_a = model(np.array(a), Batch(np.arange(20), [SeqSlice(0, 20, ca2)]))
    model(np.array(b), Batch(np.arange(9), [SeqSlice(0, 9, cb2)]))
    alone_b = model(np.array([7]), Batch(np.array([9]), [SeqSlice(0, 1, cb2)]))
    assert np.array_equal(both[:20], alone_a) and np.array_equal(both[20:], alone_b)


def test_files_the_native_runtime_does_not_serve_load_as_torch_models(tmp_path, vocab):
    """F16 projections beside a Q8_0 one (float and quantized are not mixed in one forward), phi2
    (another block), --numerics exact, --dtype bf16."""
    k_q8 = {f"blk.{i}.attn_k.weight": Q.Q8_0 for i in range(2)}
    f16 = gb.write_gguf(tmp_path / "f16.gguf", gb.tiny_llama(1), vocab=vocab, qtype=Q.F16, tensor_types=k_q8)
    phi2 = gb.write_gguf(tmp_path / "phi2.gguf", gb.tiny_phi2(1), vocab=vocab, qtype=Q.Q8_0)
    q8 = gb.write_gguf(tmp_path / "q8.gguf", gb.tiny_llama(1), vocab=vocab, qtype=Q.Q8_0)
    for path, opts in ((f16, {}), (phi2, {}), (q8, {"numerics": "exact"}), (q8, {"dtype": "bf16"})):
        assert not isinstance(_load(path, **opts), NativeModel), (path.name, opts)
    assert isinstance(_load(q8), NativeModel)


ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rotary_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = ROPES[name]
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      rope_parameters={"rope_theta": THETA, **scaling})
    kind = scaling["rope_type"]
    if kind == "default":
        want, want_factor = ROPE_INIT_FUNCTIONS["linear"](
            LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={
                "rope_theta": THETA, "rope_type": "linear", "factor": 1.0}), "cpu")
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=MAX_POS)
    from mistralrs_cli.models.rope import ROPE_INV_FREQ

    got, factor = ROPE_INV_FREQ[kind](16, THETA, scaling, MAX_POS, MAX_POS)
    assert float(np.abs(got - want.numpy()).max()) < 1e-6
    assert abs(factor - (want_factor or 1.0)) < 1e-6


def test_a_cli_run_never_imports_torch(files, tmp_path, vocab):
    """`mistralrs --prompt` on a GGUF the native runtime serves: torch stays out of the process
    (it alone is ~220 MB resident and ~1.5 s of start-up)."""
    path = gb.write_gguf(tmp_path / "tok.gguf", gb.tiny_llama(1), vocab=vocab, qtype=Q.Q8_0)
    code = ("import sys, runpy\n"
            "sys.argv = ['mistralrs', '--raw', '--temperature', '0', '--max-tokens', '4', '--prompt', 'hello world', 'gguf', '-f', sys.argv[1]]\n"
            "try:\n    runpy.run_module('mistralrs_cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps({'torch': 'torch' in sys.modules}), file=sys.stderr)\n").replace(
                "import sys, runpy", "import sys, runpy, json")
    env = {**os.environ, "MISTRALRS_CLI_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"torch": False}
    assert proc.stdout.strip(), "no text generated"


@pytest.mark.parametrize("flags", [(), ("-mno-f16c", "-mno-avx")])
def test_kv_store_writes_f16_as_numpy_rounds(flags, tmp_path):
    """The cache writes (csrc/attention.c kv_store) against numpy's float16 conversion, bit for bit,
    on values that cover ties, subnormal halves, overflow to inf and signed zeros; also the
    portable path (no F16C)."""
    import ctypes

    from mistralrs_cli.backends import native

    lib = native.build(extra_flags=flags, cache=tmp_path)
    rng = np.random.default_rng(0)
    nq, nkv, hd, n = 2, 1, 40, 3
    vals = np.concatenate([rng.standard_normal(100) * 10.0 ** rng.integers(-9, 6, 100),
                           [65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                            -0.0, 0.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 6.1e-5, 6.097e-5]]).astype(np.float32)
    qkv = np.resize(vals, (n, (nq + 2 * nkv) * hd)).astype(np.float32)
    k = np.full((nkv, 5, hd), 7.0, dtype=np.float16)
    v = np.full((nkv, 5, hd), 7.0, dtype=np.float16)
    seq = (native.AttnSeq * 1)()
    seq[0].q, seq[0].n, seq[0].k, seq[0].v = qkv.ctypes.data, n, k.ctypes.data, v.ctypes.data
    seq[0].S, seq[0].sh, seq[0].ss = 4, 5 * hd, hd  # rows land at slots 1..3
    lib.kv_store(seq, 1, ctypes.c_int64(qkv.shape[1]), nq, nkv, hd, 1)
    with np.errstate(over="ignore"):  # the overflow to inf is the point
        want_k = qkv[:, nq * hd:(nq + nkv) * hd].astype(np.float16)
        want_v = qkv[:, (nq + nkv) * hd:].astype(np.float16)
    assert np.array_equal(k[0, 1:4].view(np.uint16), want_k.view(np.uint16))
    assert np.array_equal(v[0, 1:4].view(np.uint16), want_v.view(np.uint16))
    assert (k[0, [0, 4]] == 7.0).all()  # nothing outside the slots


@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",), ("-mno-f16c", "-mno-avx", "-mno-avx2")])
def test_attention_over_an_f16_cache_equals_an_f32_cache_of_the_same_values(flags, tmp_path):
    """attn_batch reading f16 keys/values gives bit for bit what it gives reading the same values
    from f32 storage (the torch models' cache), and matches a float64 softmax within 1e-5."""
    import ctypes

    from mistralrs_cli.backends import native

    lib = native.build(extra_flags=flags, cache=tmp_path)
    rng = np.random.default_rng(1)
    nq, nkv, hd, S, window = 4, 2, 64, 37, 0
    qkv = rng.standard_normal((2, (nq + 2 * nkv) * hd)).astype(np.float32)
    k16 = rng.standard_normal((nkv, S, hd)).astype(np.float16)
    v16 = rng.standard_normal((nkv, S, hd)).astype(np.float16)
    pos = np.array([S - 2, S - 1], dtype=np.int64)
    outs = []
    for k, v, kv16 in ((k16, v16, 1), (k16.astype(np.float32), v16.astype(np.float32), 0)):
        att = np.zeros((2, nq * hd), dtype=np.float32)
        seq = (native.AttnSeq * 1)()
        seq[0].q, seq[0].n, seq[0].out, seq[0].pos = qkv.ctypes.data, 2, att.ctypes.data, pos.ctypes.data
        seq[0].k, seq[0].v, seq[0].S, seq[0].sh, seq[0].ss = k.ctypes.data, v.ctypes.data, S, S * hd, hd
        lib.attn_batch(seq, 1, ctypes.c_int64(qkv.shape[1]), ctypes.c_int64(nq * hd), nq, nkv, hd, window,
                       ctypes.c_float(0.125), ctypes.c_float(0.0), 2, kv16)
        outs.append(att)
    assert np.array_equal(outs[0], outs[1])
    kf, vf = k16.astype(np.float64), v16.astype(np.float64)
    for t in range(2):
        for h in range(nq):
            q = qkv[t, h * hd:(h + 1) * hd].astype(np.float64)
            sc = kf[h // 2, :pos[t] + 1] @ q * 0.125
            w = np.exp(sc - sc.max())
            want = (w / w.sum()) @ vf[h // 2, :pos[t] + 1]
            assert np.abs(outs[0][t, h * hd:(h + 1) * hd] - want).max() < 1e-5


def test_a_tensor_shape_the_metadata_disagrees_with_is_one_clear_error(tmp_path, vocab):
    """Every projection's shape is checked against the metadata before any weight is loaded
    (loaders/gguf_checks.py); the error names the tensor and both shapes."""
    from mistralrs_cli.errors import UserError

    hf = gb.tiny_llama(1)
    hf.model.layers[0].mlp.down_proj = torch.nn.Linear(96, hf.config.hidden_size, bias=False)
    path = gb.write_gguf(tmp_path / "bad.gguf", hf, vocab=vocab, qtype=Q.Q8_0)
    with pytest.raises(UserError, match=r"blk\.0\.ffn_down\.weight has shape \[64, 96\].*gives \[64, 128\]"):
        _load(path)


def test_a_fragmented_paged_cache_gives_the_same_logits(files):
    """Blocks out of order (the per-layer path that stores and gathers with numpy) against one
    contiguous slice (every layer in one C call) and the plain per-sequence cache."""
    from mistralrs_cli.engine.paged import PagedKV, PoolShape

    model = _load(files["gemma3-q8_0"])
    c = model.config
    shape = PoolShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, model.cache_dtype)
    prompt = list(range(3, 40, 2))  # 19 tokens: five blocks of 4 with the decode steps

    def run(cache):
        out = [model(np.array(prompt), Batch(np.arange(len(prompt)), [SeqSlice(0, len(prompt), cache)]))[-1]]
        for i in range(3):
            tok = int(out[-1].argmax())
            out.append(model(np.array([tok]), Batch(np.array([len(prompt) + i]), [SeqSlice(0, 1, cache)]))[-1])
        return out

    pool = PagedKV(shape, 8, 4, 0)
    frag = pool.new_sequence([])
    frag.blocks = [6, 1, 4, 2, 7, 0]  # reserved by hand, out of order
    assert not frag.contiguous
    straight = PagedKV(shape, 8, 4, 0).new_sequence([])
    assert straight.reserve(len(prompt) + 3) and straight.contiguous
    want = run(cache_for(model))
    for got in (run(frag), run(straight)):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
