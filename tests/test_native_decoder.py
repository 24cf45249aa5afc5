"""The native decoder (backends/native_decoder.py: whole layers in a few C calls) against the
model's own module path, which the other tests hold to transformers and llama.cpp: tiny llama,
qwen2 (qkv bias), gemma2 (softcap, sandwich norms) and gemma3 (q/k norms, windows) GGUFs in
Q8_0 / Q4_0 / Q4_1 (and K types 256 wide), prompts through C attention (<= 16 rows) and through
SDPA, cached decode steps, several sequences in one batch. Both paths round activations to 8
bits the same way, so logits agree exactly unless a value lands on the other side of a
rounding boundary; the bound allows for a few such flips."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends.native_decoder import NativeDecoder
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.gguf import load_gguf_model
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.models.layers import Batch, SeqSlice

CASES = {
    "llama-q8_0": (lambda: gb.tiny_llama(1), Q.Q8_0),
    "llama-q4_0": (lambda: gb.tiny_llama(2, tie_word_embeddings=True), Q.Q4_0),
    "llama-q4_1": (lambda: gb.tiny_llama(3), Q.Q4_1),
    "qwen2-q8_0": (lambda: gb.tiny_qwen2(1), Q.Q8_0),
    "gemma2-q8_0": (lambda: gb.tiny_gemma2(2), Q.Q8_0),
    "gemma3-q8_0": (lambda: gb.tiny_gemma3(1), Q.Q8_0),
    "llama256-q4_k": (lambda: gb.tiny_llama(4, hidden_size=256, intermediate_size=512), Q.Q4_K),
    "llama256-q6_k": (lambda: gb.tiny_llama(5, hidden_size=256, intermediate_size=512), Q.Q6_K),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("native_decoder")
    out = {}
    for name, (make, qtype) in CASES.items():
        hf = make()
        types = None
        if qtype in (Q.Q4_K, Q.Q6_K):  # gguf-py cannot quantize K types: real scales, random codes
            types = {n: qtype for n, w in gb.gguf_tensors(hf).items() if w.ndim == 2 and w.shape[-1] % 256 == 0}
        path = gb.write_gguf(d / f"{name}.gguf", hf, vocab=None, qtype=qtype if types is None else Q.F32,
                             tensor_types=types)
        model, _ = load_gguf_model(GGUFFile(path))
        out[name] = model
    return out


def _steps(run, prompt: list[int], n: int) -> list[torch.Tensor]:
    """Logits of the prompt's last row, then of n greedy cached steps (`run(ids, batch)`)."""
    cache = None
    outs = []
    ids, pos = prompt, list(range(len(prompt)))
    for _ in range(n + 1):
        cache = cache or run.cache()
        batch = Batch(torch.tensor(pos), [SeqSlice(0, len(ids), cache)])
        with torch.inference_mode():
            last = run(torch.tensor(ids), batch)[-1]
        outs.append(last)
        pos = [pos[-1] + 1]
        ids = [int(last.argmax())]
    return outs


class _Runner:
    def __init__(self, model, native: bool):
        self.model, self.fn = model, NativeDecoder.build(model) if native else model

    def cache(self):
        return cache_for(self.model)

    def __call__(self, ids, batch):
        return self.fn(ids, batch)


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert float((x - y).abs().max()) <= 0.05 * float(y.abs().max()), (x - y).abs().max()
        assert int(x.argmax()) == int(y.argmax())


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("prompt_len", [12, 40])  # C attention for the prompt, then torch SDPA
def test_native_equals_module_path(models, name, prompt_len):
    model = models[name]
    assert NativeDecoder.build(model) is not None, "the native decoder should take this model"
    prompt = torch.randint(2, 500, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    ours = _steps(_Runner(model, True), prompt, 6)
    ref = _steps(_Runner(model, False), prompt, 6)
    _close(ours, ref)


def test_mixed_batch_equals_each_alone(models):
    """A prompt chunk and a decode step of another sequence in one forward."""
    model = models["gemma3-q8_0"]
    nd = NativeDecoder.build(model)
    a_ids, b_ids = list(range(5, 25)), list(range(100, 109))
    ca, cb = cache_for(model), cache_for(model)
    with torch.inference_mode():
        nd(torch.tensor(b_ids), Batch(torch.arange(9), [SeqSlice(0, 9, cb)]))
        both = nd(torch.tensor(a_ids + [7]), Batch(torch.tensor(list(range(20)) + [9]),
                                                 [SeqSlice(0, 20, ca), SeqSlice(20, 21, cb)]))
        ca2, cb2 = cache_for(model), cache_for(model)
        alone_a = nd(torch.tensor(a_ids), Batch(torch.arange(20), [SeqSlice(0, 20, ca2)]))
        nd(torch.tensor(b_ids), Batch(torch.arange(9), [SeqSlice(0, 9, cb2)]))
        alone_b = nd(torch.tensor([7]), Batch(torch.tensor([9]), [SeqSlice(0, 1, cb2)]))
    assert torch.equal(both[:20], alone_a) and torch.equal(both[20:], alone_b)


def test_unsupported_blocks_keep_the_module_path(tmp_path):
    """Phi-2's parallel block is not a pre-norm gated block: no native decoder."""
    hf = gb.tiny_phi2(5)
    model, _ = load_gguf_model(GGUFFile(gb.write_gguf(tmp_path / "phi2.gguf", hf, vocab=None, qtype=Q.Q8_0)))
    assert NativeDecoder.build(model) is None
    exact, _ = load_gguf_model(GGUFFile(gb.write_gguf(tmp_path / "l.gguf", gb.tiny_llama(1), vocab=None,
                                                      qtype=Q.Q8_0)), numerics="exact")
    assert NativeDecoder.build(exact) is None  # exact numerics: transformers' path only
