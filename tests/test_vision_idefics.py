"""vision-plain on Idefics3 (SigLIP tower per tile, pixel-shuffle connector, the llama text model)
against a tiny random Idefics3ForConditionalGeneration: tiles equal Idefics3ImageProcessorPil's on
five odd images (with and without image splitting), prompt ids equal Idefics3Processor's (the
<fake_token_around_image> / <row_r_col_c> / <global-img> blocks), logits within 1e-4 with one and
two images, and greedy text through the CLI's --image equal to generate."""
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
def i3(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics3")
    hf = vm.tiny_idefics3()
    vm.save_idefics3(hf, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none"))
    return path, hf, vm.hf_idefics3_processor(path), loaded


@pytest.mark.parametrize("splitting", [True, False])
def test_pixels_match_transformers(tmp_path, splitting):
    from PIL import Image
    from transformers import Idefics3ImageProcessorPil

    theirs = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=splitting)
    theirs.save_pretrained(tmp_path)
    ours = processor_from_config(json.loads((tmp_path / "preprocessor_config.json").read_text()), "test", PROCESSORS)
    grids = set()
    for name, data in vm.odd_images().items():
        want = theirs(Image.open(io.BytesIO(data)), return_tensors="np", return_row_col_info=True)
        got = ours(vi.decode(data, name).pil)
        assert got.patches.shape == want["pixel_values"][0].shape, name
        assert np.abs(got.patches - want["pixel_values"][0]).max() <= 1e-5, name
        assert (got.rows, got.cols) == (want["rows"][0][0], want["cols"][0][0]), name
        grids.add((got.rows, got.cols))
    assert grids == ({(2, 1), (1, 2), (2, 2)} if splitting else {(0, 0)})


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
def test_ids_and_logits_match_transformers(i3, names):
    _, hf, proc, loaded = i3
    ids, mm = _ours(loaded, names)
    enc = _theirs(proc, names)
    assert enc["input_ids"][0].tolist() == ids
    assert ids.count(loaded.vision.image_token_id) == len(mm.positions)
    assert np.flatnonzero(np.asarray(ids) == loaded.vision.image_token_id).tolist() == mm.positions.tolist()
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    n = len(ids)
    got = loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, None)], list(range(n)),
                            input_embeds=(mm.positions.tolist(), loaded.vision.encode(mm.pixels)))
    assert np.abs(got - want).max() <= 1e-4


def test_cli_greedy_matches_generate(i3):
    path, hf, proc, loaded = i3
    (path / "tall.png").write_bytes(vm.odd_images()["tall"])
    enc = _theirs(proc, ["tall"])
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    want = loaded.tokenizer.decode(out[0, enc["input_ids"].shape[1]:].tolist())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                          "--max-tokens", "8", "--image", str(path / "tall.png"), "--prompt", TEXT, "vision-plain",
                          "-m", str(path), "-a", "idefics3"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"


def test_typed_placeholder_matches_transformers(i3):
    """mistral.rs's convention: the user types <image> in the text part; it is used as typed."""
    from PIL import Image

    _, _, proc, loaded = i3
    url = "data:image/png;base64," + base64.b64encode(vm.odd_images()["wide"]).decode()
    typed = "look: <image> " + TEXT
    ids, mm = chat_with_images(loaded, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": typed}]}], allow_paths=False)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": typed}]}],
                                    add_generation_prompt=True, tokenize=False)
    enc = proc(text=text, images=[Image.open(io.BytesIO(vm.odd_images()["wide"]))], add_special_tokens=False)
    assert enc["input_ids"][0] == ids and len(mm.positions) == 3 * 4  # two tiles and the global image


@pytest.mark.parametrize("side", [4, 19, 26, 29])
def test_tile_position_ids_match_transformers(side):
    """transformers buckets a tile's patch coordinates in float32; for 19 or 29 patches a side that
    is not the identity, and the embeddings must follow it."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    from mistralrs_cli.models.idefics3 import Idefics3Embeddings
    from mistralrs_cli.vision.clip import VisionConfig

    torch.manual_seed(0)
    theirs = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=8, image_size=2 * side, patch_size=2)).eval()
    ours = Idefics3Embeddings(VisionConfig(hidden_size=8, image_size=2 * side, patch_size=2))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 2 * side, 2 * side)
    with torch.no_grad():
        want = theirs(x, torch.ones(2, side, side, dtype=torch.bool))
        assert torch.allclose(ours(x), want, atol=1e-6)
