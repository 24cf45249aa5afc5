"""vision-plain on multimodal Gemma 3 (SigLIP + pooled projector, the gemma3_text model) against
a tiny random Gemma3ForConditionalGeneration: pixels equal Gemma3ImageProcessorPil's on five odd
images, prompt ids and image rows equal Gemma3Processor's, logits within 1e-4 with one and two
images (an image's rows attend to each other both ways, as transformers' mask has it: the test
checks that this matters), and greedy text through the engine with prefill chunks that would
end inside an image equal to generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vision_models as vm
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.types import EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    return vm.checkpoint(tmp_path_factory, "gemma3_mm", vm.tiny_gemma3_mm(), vm.save_gemma3_mm,
                         vm.hf_gemma3_processor)


def test_pixels_match_transformers(g3):
    path, _, proc, _ = g3
    for name, got, want in vm.processed_pairs(proc.image_processor, vm.our_processor(path)):
        assert np.abs(got - want["pixel_values"][0]).max() <= 1e-5, name


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(g3, names):
    _, hf, proc, loaded = g3
    ids, mm = vm.our_chat(loaded, names)
    enc = vm.hf_chat(proc, names)
    assert enc["input_ids"][0].tolist() == ids
    assert np.flatnonzero(enc["token_type_ids"][0].numpy()).tolist() == mm.positions.tolist()
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    assert np.abs(vm.our_logits(loaded, ids, mm, {0: mm.spans}) - want).max() <= 1e-4
    assert np.abs(vm.our_logits(loaded, ids, mm) - want).max() > 1e-3  # causal-only image rows would not match


def test_engine_chunks_never_end_inside_an_image(g3):
    """A 12-token budget would end the first chunk at position 12, inside the image's rows
    (10..13): the chunk stops before them instead, and the answer is transformers'."""
    _, hf, proc, loaded = g3
    ids, mm = vm.our_chat(loaded, ["tall"])
    assert mm.spans == [(10, 14)] and mm.chunk(0, 12) == 10 and mm.chunk(10, 2) == 4
    enc = vm.hf_chat(proc, ["tall"])
    want = vm.hf_greedy(hf, proc, vm.TEXT, [vm.odd_images()["tall"]], 6)
    engine = Engine(loaded, EngineConfig(max_batch_tokens=12))
    outs = list(engine.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5),
                                images=mm))
    assert [o.token_id for o in outs if o.token_id is not None] == want
    with torch.no_grad():  # the first token's log-probabilities (greedy text alone hides a cut image:
        ref = torch.log_softmax(hf(**enc).logits[0, -1], -1).numpy()  # 0.02 off, same tokens here)
    assert max(abs(lp - ref[tok]) for tok, lp in outs[0].top_logprobs) <= 1e-4


def test_cli_greedy_matches_generate(g3):
    path, hf, proc, loaded = g3
    vm.check_cli_greedy(path, hf, proc, loaded, "wide", "gemma3")


def test_isq_image_prefill_runs_on_the_native_executor(g3):
    """--isq Q8_0: the fused CPU executor takes Gemma 3's image prefills too (their spans reach its
    attention kernel: each image row sees its image's later rows); its logits equal the torch
    modules' (image_mask) on the same quantized weights, and differ from a causal-only prefill."""
    from mistralrs_cli.engine.kv_cache import SeqKVCache
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.models.batch import SeqSlice
    from mistralrs_cli.types import LoadOptions, VisionSpec

    path = g3[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none", isq="Q8_0"))
    model, cfg = loaded.model, loaded.config
    executor = model.native
    assert executor is not None
    ids, mm = vm.our_chat(loaded, ["wide", "gray"])
    assert len(mm.spans) == 2
    n = len(ids)
    feats = loaded.vision.encode(mm.pixels)

    class Spy:  # counts the attention calls that carried spans to the kernel
        def __init__(self, lib):
            self.lib, self.with_spans = lib, 0

        def __getattr__(self, name):
            f = getattr(self.lib, name)
            if name != "attn_batch":
                return f

            def call(seqs, count, *args):
                self.with_spans += sum(1 for e in seqs[:count] if e.span_end)
                return f(seqs, count, *args)
            return call

    def logits(spans):
        cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        embeds = (mm.positions.tolist(), feats) + ((spans,) if spans else ())
        return model.step(ids, list(range(n)), [SeqSlice(0, n, cache)], list(range(n)), input_embeds=embeds)

    spy = executor.lib = Spy(executor.lib)
    try:
        native, causal = logits({0: mm.spans}), logits(None)
    finally:
        executor.lib = spy.lib
    assert spy.with_spans == cfg.num_hidden_layers  # one call per layer, from the spanned prefill only
    model.native = None
    try:
        reference = logits({0: mm.spans})
    finally:
        model.native = executor
    assert np.abs(native - reference).max() <= 1e-3 * np.abs(reference).max()
    assert np.abs(native - causal).max() > 1e-2 * np.abs(reference).max()
