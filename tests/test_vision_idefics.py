"""vision-plain on Idefics3 (SigLIP tower per tile, pixel-shuffle connector, the llama text model)
against a tiny random Idefics3ForConditionalGeneration: tiles equal Idefics3ImageProcessorPil's on
five odd images (with and without image splitting), prompt ids equal Idefics3Processor's (the
<fake_token_around_image> / <row_r_col_c> / <global-img> blocks), logits within 1e-4 with one and
two images, and greedy text through the CLI's --image equal to generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vision_models as vm
from mistralrs_cli.vision.idefics_processor import PROCESSORS


@pytest.fixture(scope="module")
def i3(tmp_path_factory):
    return vm.checkpoint(tmp_path_factory, "idefics3", vm.tiny_idefics3(), vm.save_idefics3, vm.hf_idefics3_processor)


@pytest.mark.parametrize("splitting", [True, False])
def test_pixels_match_transformers(tmp_path, splitting):
    from transformers import Idefics3ImageProcessorPil

    theirs = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=splitting)
    theirs.save_pretrained(tmp_path)
    grids = set()
    for name, got, want in vm.processed_pairs(theirs, vm.our_processor(tmp_path, PROCESSORS), return_row_col_info=True):
        assert got.patches.shape == want["pixel_values"][0].shape, name
        assert np.abs(got.patches - want["pixel_values"][0]).max() <= 1e-5, name
        assert (got.rows, got.cols) == (want["rows"][0][0], want["cols"][0][0]), name
        grids.add((got.rows, got.cols))
    assert grids == ({(2, 1), (1, 2), (2, 2)} if splitting else {(0, 0)})


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(i3, names):
    _, hf, proc, loaded = i3
    ids, mm, _ = vm.check_ids_and_logits(hf, proc, loaded, names)
    assert ids.count(loaded.vision.image_token_id) == len(mm.positions)
    assert np.flatnonzero(np.asarray(ids) == loaded.vision.image_token_id).tolist() == mm.positions.tolist()


def test_cli_greedy_matches_generate(i3):
    path, hf, proc, loaded = i3
    vm.check_cli_greedy(path, hf, proc, loaded, "tall", "idefics3")


def test_typed_placeholder_matches_transformers(i3):
    """mistral.rs's convention: the user types <image> in the text part; it is used as typed."""
    _, _, proc, loaded = i3
    ids, mm, want = vm.typed_placeholder(loaded, proc, "wide", "look: <image> " + vm.TEXT)
    assert want == ids and len(mm.positions) == 3 * 4  # two tiles and the global image


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
