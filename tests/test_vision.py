"""vision-plain, the mechanism: transformers' CLIPImageProcessor (its PIL backend) against ours
on five odd images (pixels within 1e-5), and a tiny random LlavaForConditionalGeneration
against our llama text model + CLIP tower + projector (logits within 1e-4 for prompts with one
and two images, and greedy text through the engine equal to transformers' generate)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vision_models as vm
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.layers import SeqSlice
from mistralrs_cli.types import EngineConfig, LoadOptions, SamplingParams, VisionSpec
from mistralrs_cli.vision import images as vi

F32_TOL = 1e-4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    hf = vm.tiny_llava(0)
    path, loaded = vm.load_saved(tmp_path_factory, "llava", hf, vm.save_llava)
    return path, hf, loaded


@pytest.mark.parametrize("sizes", [(40, 32), (24, 32), (32, 32)])  # shortest edge, crop (24: padded)
def test_pixels_match_transformers(tmp_path, sizes):
    from transformers import CLIPImageProcessorPil

    edge, crop = sizes
    CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop}).save_pretrained(tmp_path)
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path)
    for name, got, want in vm.processed_pairs(ref, vm.our_processor(tmp_path)):
        want = want["pixel_values"][0]
        assert got.shape == want.shape and got.dtype == np.float32, name
        assert np.abs(got - want).max() <= 1e-5, name


def _prompt(loaded, n_images: int, text: str) -> list[int]:
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    rendered = loaded.chat_template.render([{"role": "user", "content": parts}], bos_token=loaded.bos_token,
                                           eos_token=loaded.eos_token, flatten_content=False)
    return loaded.tokenizer.encode(rendered, add_special_tokens=False)


@pytest.mark.parametrize("names", [["tall"], ["rgba", "wide"]])
def test_logits_match_transformers(llava, names):
    _, hf, loaded = llava
    imgs = [vi.decode(vm.odd_images()[n], n) for n in names]
    ids, mm = loaded.vision.expand(_prompt(loaded, len(imgs), "the quick brown fox"), imgs, "test")
    assert ids.count(loaded.vision.image_token_id) == 16 * len(imgs)
    want = vm.hf_logits(hf, ids, np.stack(mm.pixels)).numpy()
    assert np.abs(vm.our_logits(loaded, ids, mm) - want).max() <= F32_TOL


def test_engine_greedy_matches_transformers_generate(llava):
    """Chunked prefill (8-token chunks split the image rows across steps) and cached decoding."""
    _, hf, loaded = llava
    imgs = [vi.decode(vm.odd_images()[n], n) for n in ("gray", "tiny")]
    ids, mm = loaded.vision.expand(_prompt(loaded, 2, "rain falls in spain"), imgs, "test")
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(np.stack(mm.pixels)),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    want = out[0, len(ids):].tolist()
    engine = Engine(loaded, EngineConfig(max_batch_tokens=8))
    got = [o.token_id for o in engine.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True), images=mm)
           if o.token_id is not None]
    assert got == want


def test_placeholder_count_must_match(llava):
    _, _, loaded = llava
    img = vi.decode(vm.odd_images()["tiny"], "tiny")
    with pytest.raises(UserError, match="0 image placeholder"):
        loaded.vision.expand(_prompt(loaded, 0, "no image here"), [img], "messages")


def test_isq_text_model_runs_image_rows_on_the_native_executor(llava):
    """--isq Q8_0: the language model's fused CPU executor (backends/native_decoder.py) takes the
    image rows too; its logits equal the torch modules' on the same quantized weights."""
    from mistralrs_cli.engine.kv_cache import SeqKVCache

    path = llava[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load(VisionSpec(str(path)), LoadOptions(token_source="none", isq="Q8_0"))
    model, cfg = loaded.model, loaded.config
    assert model.native is not None
    img = vi.decode(vm.odd_images()["tall"], "tall")
    ids, mm = loaded.vision.expand(_prompt(loaded, 1, "the quick brown fox"), [img], "test")
    n = len(ids)

    def logits(embeds):
        cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        return model.step(ids, list(range(n)), [SeqSlice(0, n, cache)], list(range(n)), input_embeds=embeds)

    embeds = (mm.positions.tolist(), loaded.vision.encode(mm.pixels))
    native, executor = logits(embeds), model.native
    model.native = None
    try:
        reference = logits(embeds)
    finally:
        model.native = executor
    assert np.abs(native - reference).max() <= 1e-3 * np.abs(reference).max()
    assert np.abs(native - logits(None)).max() > 0.1  # the image rows did reach the executor


def test_spec_ngram_is_off_on_a_vision_model(llava, caplog):
    """Speculative passes carry no image rows: --spec-ngram on a vision model is turned off with a
    warning, and the answer is the plain one."""
    import dataclasses

    from mistralrs_cli.loaders.speculative import ngram_config

    _, _, loaded = llava
    img = vi.decode(vm.odd_images()["tall"], "tall")
    ids, mm = loaded.vision.expand(_prompt(loaded, 1, "the quick brown fox"), [img], "test")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain = [o.token_id for o in Engine(loaded).generate(ids, params, images=mm) if o.token_id is not None]
    with caplog.at_level("WARNING"):
        engine = Engine(dataclasses.replace(loaded, speculative=ngram_config(2)))
    assert engine.spec is None and "speculative decoding is off: it does not run on a vision model" in caplog.text
    assert [o.token_id for o in engine.generate(ids, params, images=mm) if o.token_id is not None] == plain


def _copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _drop_vision_tensor(d):
    from safetensors.torch import load_file, save_file

    w = load_file(d / "model.safetensors")
    w.pop(next(k for k in w if "post_layernorm" not in k and "vision_tower" in k and k.endswith("fc1.weight")))
    save_file(w, d / "model.safetensors")


def _text_config(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))


@pytest.mark.parametrize("case,arch,words", [
    ("no-processor", None, "preprocessor_config.json is missing"),
    ("unknown-arch", "mllama", "--arch mllama is not a vision architecture this build runs (supported: gemma3, idefics2, idefics3, llava, llava_next, phi3_v)"),
    ("text-model", None, "architecture LlamaForCausalLM is not a supported vision model"),
    ("damaged", None, "the vision weights do not fit a llava encoder"),
])
def test_bad_checkpoints_are_one_user_error(llava, tmp_path, case, arch, words):
    edits = {"no-processor": lambda d: (d / "preprocessor_config.json").unlink(), "unknown-arch": lambda d: None,
             "text-model": _text_config, "damaged": _drop_vision_tensor}
    d = _copy(llava[0], tmp_path / case, edits[case])
    with pytest.raises(UserError) as e:
        load(VisionSpec(str(d), arch), LoadOptions(token_source="none"))
    assert words in str(e.value) and "\n" not in str(e.value)
