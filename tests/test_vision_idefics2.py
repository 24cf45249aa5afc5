"""vision-plain on Idefics2 (SigLIP over frames of their own sizes, padded together and masked,
the MLP + perceiver resampler connector, the mistral text model) against a tiny random
Idefics2ForConditionalGeneration: frames equal Idefics2ImageProcessorPil's on five odd images
(with and without image splitting), prompt ids equal Idefics2Processor's (adjacent images share a
fake token, a word after an image gets a space), logits within 1e-4 with one and two images of
different sizes, and greedy text through the CLI's --image equal to generate."""
from __future__ import annotations

import numpy as np
import pytest

import vision_models as vm
from mistralrs_cli.vision.idefics_processor import PROCESSORS


@pytest.fixture(scope="module")
def i2(tmp_path_factory):
    return vm.checkpoint(tmp_path_factory, "idefics2", vm.tiny_idefics2(), vm.save_idefics2, vm.hf_idefics2_processor)


@pytest.mark.parametrize("splitting", [True, False])
def test_frames_match_transformers(tmp_path, splitting):
    from transformers import Idefics2ImageProcessorPil

    theirs = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48}, do_image_splitting=splitting)
    theirs.save_pretrained(tmp_path)
    for name, got, want in vm.processed_pairs(theirs, vm.our_processor(tmp_path, PROCESSORS)):
        frames = got.frames
        assert len(frames) == (5 if splitting else 1) == want["pixel_values"].shape[1], name
        for f, w, m in zip(frames, want["pixel_values"][0], want["pixel_attention_mask"][0]):
            assert m.sum() == f.shape[1] * f.shape[2] and m[:f.shape[1], :f.shape[2]].all(), name
            assert np.abs(f - w[:, :f.shape[1], :f.shape[2]]).max() <= 1e-5, name


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(i2, names):
    _, hf, proc, loaded = i2
    ids, mm, _ = vm.check_ids_and_logits(hf, proc, loaded, names)
    assert np.flatnonzero(np.asarray(ids) == loaded.vision.image_token_id).tolist() == mm.positions.tolist()
    assert len(mm.positions) == len(names) * 5 * 4


def test_cli_greedy_matches_generate(i2):
    path, hf, proc, loaded = i2
    vm.check_cli_greedy(path, hf, proc, loaded, "wide", "idefics2")


def test_typed_placeholder_matches_transformers(i2):
    """mistral.rs's convention: the user types <image> in the text part; it is used as typed."""
    _, _, proc, loaded = i2
    ids, mm, want = vm.typed_placeholder(loaded, proc, "gray", "look:<image>" + vm.TEXT)
    assert want == ids and len(mm.positions) == 5 * 4


def test_an_image_too_small_to_split_is_one_error_line(i2, tmp_path):
    """A 1x1 image: with splitting its quarters are empty (transformers' own processor divides by
    zero on it); the CLI says what the image needs, in one line, with no traceback."""
    import io
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    path, _, proc, _ = i2
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, "PNG")
    with pytest.raises(ZeroDivisionError):
        proc.image_processor(Image.open(io.BytesIO(buf.getvalue())), return_tensors="np")
    (tmp_path / "dot.png").write_bytes(buf.getvalue())
    res = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--max-tokens", "2", "--image",
                          str(tmp_path / "dot.png"), "--prompt", vm.TEXT, "vision-plain", "-m", str(path)],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --image: image 1 is 1x1 pixels; this Idefics2 checkpoint splits each image in four, so each "
        "side needs at least 2 pixels; send a larger image.")
