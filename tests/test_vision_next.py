"""vision-plain -a llava_next (LLaVA 1.6, "anyres" tiling) on a tiny random
LlavaNextForConditionalGeneration: our processor's tiles equal LlavaNextImageProcessorPil's on
five odd images, the prompt ids equal transformers' LlavaNextProcessor's (its image token counts),
logits within 1e-4 with one and two images, greedy text through the CLI equal to generate."""
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
from mistralrs_cli.vision.processors import processor_from_config

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next")
    hf = vm.tiny_llava_next(2)
    vm.save_llava_next(hf, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path), "llava_next"), LoadOptions(token_source="none"))
    return path, hf, vm.hf_llava_next_processor(path), loaded


def test_tiles_match_transformers(nxt):
    from PIL import Image

    path, _, proc, _ = nxt
    ours = processor_from_config(json.loads((path / "preprocessor_config.json").read_text()), "test")
    for name, data in vm.odd_images().items():
        want = proc.image_processor(Image.open(io.BytesIO(data)), return_tensors="np")
        got = ours(vi.decode(data, name).pil)
        assert got.patches.shape == want["pixel_values"][0].shape, name
        assert np.abs(got.patches - want["pixel_values"][0]).max() <= 1e-5, name
        assert list(got.size) == list(want["image_sizes"][0])


def _uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(vm.odd_images()[name]).decode()


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(nxt, names):
    from PIL import Image

    _, hf, proc, loaded = nxt
    parts = [{"type": "image_url", "image_url": {"url": _uri(n)}} for n in names] + [{"type": "text", "text": TEXT}]
    ids, mm = chat_with_images(loaded, [{"role": "user", "content": parts}], allow_paths=False)
    content = [{"type": "image"} for _ in names] + [{"type": "text", "text": TEXT}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    enc = proc(text=prompt, images=[Image.open(io.BytesIO(vm.odd_images()[n])) for n in names], return_tensors="pt",
               add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == ids
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    n = len(ids)
    got = loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, None)], list(range(n)),
                            input_embeds=(mm.positions.tolist(), loaded.vision.encode(mm.pixels)))
    assert np.abs(got - want).max() <= 1e-4


def test_cli_greedy_matches_generate(nxt):
    path, hf, proc, loaded = nxt
    (path / "rgba.png").write_bytes(vm.odd_images()["rgba"])
    want = loaded.tokenizer.decode(vm.hf_greedy(hf, proc, TEXT, [vm.odd_images()["rgba"]], 8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                          "--max-tokens", "8", "--image", str(path / "rgba.png"), "--prompt", TEXT, "vision-plain",
                          "-m", str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
