"""vision-plain on Idefics2 (SigLIP over frames of their own sizes, padded together and masked,
the MLP + perceiver resampler connector, the mistral text model) against a tiny random
Idefics2ForConditionalGeneration: frames equal Idefics2ImageProcessorPil's on five odd images
(with and without image splitting), prompt ids equal Idefics2Processor's (adjacent images share a
fake token, a word after an image gets a space), logits within 1e-4 with one and two images of
different sizes, and greedy text through the CLI's --image equal to generate."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_models as vm
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.layers import SeqSlice
from mistralrs_cli.types import LoadOptions, VisionSpec
from mistralrs_cli.vision import images as vi
from mistralrs_cli.vision.chat import chat_with_images
from mistralrs_cli.vision.idefics_processor import PROCESSORS
from mistralrs_cli.vision.processors import processor_from_config

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def i2(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics2")
    hf = vm.tiny_idefics2()
    vm.save_idefics2(hf, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none"))
    return path, hf, vm.hf_idefics2_processor(path), loaded


@pytest.mark.parametrize("splitting", [True, False])
def test_frames_match_transformers(tmp_path, splitting):
    from PIL import Image
    from transformers import Idefics2ImageProcessorPil

    theirs = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48}, do_image_splitting=splitting)
    theirs.save_pretrained(tmp_path)
    ours = processor_from_config(json.loads((tmp_path / "preprocessor_config.json").read_text()), "test", PROCESSORS)
    for name, data in vm.odd_images().items():
        want = theirs(Image.open(io.BytesIO(data)), return_tensors="np")
        frames = ours(vi.decode(data, name).pil).frames
        assert len(frames) == (5 if splitting else 1) == want["pixel_values"].shape[1], name
        for f, w, m in zip(frames, want["pixel_values"][0], want["pixel_attention_mask"][0]):
            assert m.sum() == f.shape[1] * f.shape[2] and m[:f.shape[1], :f.shape[2]].all(), name
            assert np.abs(f - w[:, :f.shape[1], :f.shape[2]]).max() <= 1e-5, name


def _ours(loaded, names, text=TEXT):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        vm.odd_images()[n]).decode()}} for n in names] + [{"type": "text", "text": text}]
    return chat_with_images(loaded, [{"role": "user", "content": parts}], allow_paths=False)


def _theirs(proc, names, text=TEXT):
    from PIL import Image

    content = [{"type": "image"} for _ in names] + [{"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=False)
    return proc(text=prompt, images=[Image.open(io.BytesIO(vm.odd_images()[n])) for n in names],
                return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(i2, names):
    _, hf, proc, loaded = i2
    ids, mm = _ours(loaded, names)
    enc = _theirs(proc, names)
    assert enc["input_ids"][0].tolist() == ids
    assert np.flatnonzero(np.asarray(ids) == loaded.vision.image_token_id).tolist() == mm.positions.tolist()
    assert len(mm.positions) == len(names) * 5 * 4
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    n = len(ids)
    got = loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, None)], list(range(n)),
                            input_embeds=(mm.positions.tolist(), loaded.vision.encode(mm.pixels)))
    assert np.abs(got - want).max() <= 1e-4


def test_cli_greedy_matches_generate(i2):
    path, hf, proc, loaded = i2
    (path / "wide.png").write_bytes(vm.odd_images()["wide"])
    enc = _theirs(proc, ["wide"])
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    want = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:].tolist())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                          "--max-tokens", "8", "--image", str(path / "wide.png"), "--prompt", TEXT, "vision-plain",
                          "-m", str(path), "-a", "idefics2"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"


def test_typed_placeholder_matches_transformers(i2):
    """mistral.rs's convention: the user types <image> in the text part; it is used as typed."""
    from PIL import Image

    _, _, proc, loaded = i2
    url = "data:image/png;base64," + base64.b64encode(vm.odd_images()["gray"]).decode()
    typed = "look:<image>" + TEXT
    ids, mm = chat_with_images(loaded, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": typed}]}], allow_paths=False)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": typed}]}],
                                    add_generation_prompt=True, tokenize=False)
    enc = proc(text=text, images=[Image.open(io.BytesIO(vm.odd_images()["gray"]))], add_special_tokens=False)
    assert enc["input_ids"][0] == ids and len(mm.positions) == 5 * 4
