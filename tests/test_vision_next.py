"""vision-plain -a llava_next (LLaVA 1.6, "anyres" tiling) on a tiny random
LlavaNextForConditionalGeneration: our processor's tiles equal LlavaNextImageProcessorPil's on
five odd images, the prompt ids equal transformers' LlavaNextProcessor's (its image token counts),
logits within 1e-4 with one and two images, greedy text through the CLI equal to generate."""
from __future__ import annotations

import numpy as np
import pytest

import vision_models as vm


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    return vm.checkpoint(tmp_path_factory, "llava_next", vm.tiny_llava_next(2), vm.save_llava_next,
                         vm.hf_llava_next_processor, "llava_next")


def test_tiles_match_transformers(nxt):
    path, _, proc, _ = nxt
    for name, got, want in vm.processed_pairs(proc.image_processor, vm.our_processor(path)):
        assert got.patches.shape == want["pixel_values"][0].shape, name
        assert np.abs(got.patches - want["pixel_values"][0]).max() <= 1e-5, name
        assert list(got.size) == list(want["image_sizes"][0])


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_transformers(nxt, names):
    _, hf, proc, loaded = nxt
    vm.check_ids_and_logits(hf, proc, loaded, names)


def test_cli_greedy_matches_generate(nxt):
    path, hf, proc, loaded = nxt
    vm.check_cli_greedy(path, hf, proc, loaded, "rgba", None)
