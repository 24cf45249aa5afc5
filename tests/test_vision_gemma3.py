"""vision-plain on multimodal Gemma 3 (SigLIP + pooled projector, the gemma3_text model) against
a tiny random Gemma3ForConditionalGeneration: pixels equal Gemma3ImageProcessorPil's on five odd
images, prompt ids and image rows equal Gemma3Processor's, logits within 1e-4 with one and two
images (an image's rows attend to each other both ways, as transformers' mask has it: the test
checks that this matters), and greedy text through the engine with prefill chunks that would
end inside an image equal to generate."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

import vision_models as vm
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.layers import SeqSlice
from mistralrs_cli.types import EngineConfig, LoadOptions, SamplingParams, VisionSpec
from mistralrs_cli.vision import images as vi
from mistralrs_cli.vision.chat import chat_with_images
from mistralrs_cli.vision.processors import processor_from_config

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_mm")
    hf = vm.tiny_gemma3_mm()
    vm.save_gemma3_mm(hf, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none"))
    return path, hf, vm.hf_gemma3_processor(path), loaded


def test_pixels_match_transformers(g3):
    from PIL import Image

    path, _, proc, _ = g3
    ours = processor_from_config(json.loads((path / "preprocessor_config.json").read_text()), "test")
    for name, data in vm.odd_images().items():
        want = proc.image_processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
        assert np.abs(ours(vi.decode(data, name).pil) - want).max() <= 1e-5, name


def _ours(loaded, names):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        vm.odd_images()[n]).decode()}} for n in names] + [{"type": "text", "text": TEXT}]
    return chat_with_images(loaded, [{"role": "user", "content": parts}], allow_paths=False)


def _theirs(proc, names):
    from PIL import Image

    content = [{"type": "image"} for _ in names] + [{"type": "text", "text": TEXT}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return proc(text=text, images=[Image.open(io.BytesIO(vm.odd_images()[n])) for n in names], return_tensors="pt",
                add_special_tokens=False)


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(g3, names):
    _, hf, proc, loaded = g3
    ids, mm = _ours(loaded, names)
    enc = _theirs(proc, names)
    assert enc["input_ids"][0].tolist() == ids
    assert np.flatnonzero(enc["token_type_ids"][0].numpy()).tolist() == mm.positions.tolist()
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    n = len(ids)
    feats = loaded.vision.encode(mm.pixels)

    def logits(*blocks):
        return loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, None)], list(range(n)),
                                 input_embeds=(mm.positions.tolist(), feats, *blocks))

    assert np.abs(logits({0: mm.spans}) - want).max() <= 1e-4
    assert np.abs(logits() - want).max() > 1e-3  # causal-only image rows would not match


def test_engine_chunks_never_end_inside_an_image(g3):
    """A 12-token budget would end the first chunk at position 12, inside the image's rows
    (10..13): the chunk stops before them instead, and the answer is transformers'."""
    _, hf, proc, loaded = g3
    ids, mm = _ours(loaded, ["tall"])
    assert mm.spans == [(10, 14)] and mm.chunk(0, 12) == 10 and mm.chunk(10, 2) == 4
    enc = _theirs(proc, ["tall"])
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
    want = out[0, len(ids):].tolist()
    engine = Engine(loaded, EngineConfig(max_batch_tokens=12))
    outs = list(engine.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5),
                                images=mm))
    assert [o.token_id for o in outs if o.token_id is not None] == want
    with torch.no_grad():  # the first token's log-probabilities (greedy text alone hides a cut image:
        ref = torch.log_softmax(hf(**enc).logits[0, -1], -1).numpy()  # 0.02 off, same tokens here)
    assert max(abs(lp - ref[tok]) for tok, lp in outs[0].top_logprobs) <= 1e-4


def test_cli_greedy_matches_generate(g3):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, hf, proc, loaded = g3
    (path / "wide.png").write_bytes(vm.odd_images()["wide"])
    enc = _theirs(proc, ["wide"])
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    want = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:].tolist())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                          "--max-tokens", "8", "--image", str(path / "wide.png"), "--prompt", TEXT, "vision-plain",
                          "-m", str(path), "-a", "gemma3"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
