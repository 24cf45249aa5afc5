"""Tiny random vision-language checkpoints built with transformers inside the tests, and odd
test images (RGBA, grayscale, tall, wide, tiny) made with Pillow, and the checks every vision
architecture's tests share (ours against transformers' processor, model, generate)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch

import tiny_models as tm

IMAGE_TOKEN = "<image>"
# a llava-style template: image parts become <image> lines before the text, as llava-hf's does
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'].upper() + ': ' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def odd_images() -> dict[str, bytes]:
    """Five PNG/JPEG files of odd sizes and modes, seeded."""
    from PIL import Image

    rng = np.random.default_rng(7)

    def enc(img, fmt="PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    def noise(h, w, c):
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)

    return {
        "rgba": enc(Image.fromarray(noise(45, 61, 4), "RGBA")),
        "gray": enc(Image.fromarray(noise(50, 40, 1)[..., 0], "L")),
        "tall": enc(Image.fromarray(noise(300, 37, 3), "RGB"), "JPEG"),
        "wide": enc(Image.fromarray(noise(29, 211, 3), "RGB")),
        "tiny": enc(Image.fromarray(noise(3, 5, 3), "RGB")),
    }


def save_tokenizer(path: Path, specials: list[str], template: str, **config: object) -> None:
    """tiny_models' tokenizer with the architecture's special tokens, and its tokenizer_config.json."""
    tok = tm.train_tokenizer()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": tm.BOS, "eos_token": tm.EOS, **config, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def hf_tokenizer(path: Path, **kw: object):
    """transformers' fast tokenizer over the saved tokenizer.json, for the reference processors."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=tm.BOS, eos_token=tm.EOS,
                                   **kw)


def tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 8, **text: object):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=patch, projection_dim=32)
    tc = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=tm.VOCAB + 1, max_position_embeddings=512,
                               rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False,
                               bos_token_id=0, eos_token_id=1), **text})
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tm.VOCAB))
    tm.randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def save_llava(model, path: Path, crop: int = 32, shortest_edge: int = 40) -> Path:
    """The checkpoint, a tokenizer with <image> at id VOCAB, the template and the CLIP processor."""
    from transformers import CLIPImageProcessorPil

    model.save_pretrained(path)
    save_tokenizer(path, [IMAGE_TOKEN], TEMPLATE, add_bos_token=True)
    CLIPImageProcessorPil(size={"shortest_edge": shortest_edge},
                          crop_size={"height": crop, "width": crop}).save_pretrained(path)
    return path


def hf_processor(path: Path):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(path)


def hf_logits(model, ids: list[int], pixels: np.ndarray | None) -> torch.Tensor:
    with torch.no_grad():
        kw = {} if pixels is None else {"pixel_values": torch.from_numpy(pixels)}
        return model(input_ids=torch.tensor([ids]), **kw).logits[0]


def hf_llava_processor(path: Path):
    """transformers' own LlavaProcessor over the saved checkpoint: the independent reference for
    the prompt (template + <image> expansion) and the pixels."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(path), tokenizer=hf_tokenizer(path),
                          patch_size=8, vision_feature_select_strategy="default", chat_template=TEMPLATE,
                          num_additional_image_tokens=1)


def hf_encode(processor, text: str, images: list[bytes]):
    """transformers' processor on a one-turn chat with the images first, as our CLI and server
    place them: the reference ids and pixels."""
    from PIL import Image

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    pil = [Image.open(io.BytesIO(b)) for b in images] or None
    return processor(text=prompt, images=pil, return_tensors="pt", add_special_tokens=False)


def hf_greedy(model, processor, text: str, images: list[bytes], n: int) -> list[int]:
    """transformers' greedy continuation (n tokens, end tokens ignored) of hf_encode's prompt."""
    enc = hf_encode(processor, text, images)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    return out[0, enc["input_ids"].shape[1]:].tolist()


PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def tiny_llava_next(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=tm.VOCAB + 1, max_position_embeddings=1024,
                     rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vc, text_config=tc,
                                                              image_token_index=tm.VOCAB, image_grid_pinpoints=PINPOINTS))
    tm.randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def save_llava_next(model, path: Path) -> Path:
    from transformers import LlavaNextImageProcessorPil

    save_llava(model, path)
    LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_grid_pinpoints=PINPOINTS).save_pretrained(path)
    return path


def hf_llava_next_processor(path: Path):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil.from_pretrained(path),
                              tokenizer=hf_tokenizer(path),
                              patch_size=8, vision_feature_select_strategy="default", chat_template=TEMPLATE,
                              num_additional_image_tokens=1)


GEMMA3_TEMPLATE = TEMPLATE.replace("<image>\\n", "<start_of_image>")
GEMMA3_SPECIALS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]


def tiny_gemma3_mm(seed: int = 3):
    """A multimodal Gemma 3: SigLIP (32 px, 8 px patches) pooled to 4 rows per image, a 7-layer
    text model with an 8-token sliding window (a prompt with images already slides)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, vocab_size=tm.VOCAB + 3,
                          max_position_embeddings=512, sliding_window=8, rms_norm_eps=1e-6, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)
    model = Gemma3ForConditionalGeneration(Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=4,
                                                        boi_token_index=tm.VOCAB, image_token_index=tm.VOCAB + 1,
                                                        eoi_token_index=tm.VOCAB + 2))
    tm.randomize_(model, seed, std=0.15, norm_center=0.0, embed_std=0.15)
    return model.eval()


def save_gemma3_mm(model, path: Path) -> Path:
    from transformers import Gemma3ImageProcessorPil

    model.save_pretrained(path)
    save_tokenizer(path, GEMMA3_SPECIALS, GEMMA3_TEMPLATE)
    Gemma3ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def hf_gemma3_processor(path: Path):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    boi, soft, eoi = GEMMA3_SPECIALS
    tok = hf_tokenizer(path, extra_special_tokens={"boi_token": boi, "image_token": soft, "eoi_token": eoi})
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil.from_pretrained(path), tokenizer=tok,
                           chat_template=GEMMA3_TEMPLATE, image_seq_length=4)


IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                     *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]
IDEFICS3_TEMPLATE = TEMPLATE.replace("<image>\\n", "<image>")


def tiny_idefics3(seed: int = 5):
    """Idefics3: SigLIP-style tower on 32 px tiles (8 px patches, 16 patches), pixel shuffle by 2
    (4 rows per tile), a 2-layer llama."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig

    vc = Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=tm.VOCAB + len(IDEFICS3_SPECIALS), max_position_embeddings=1024,
                     rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = Idefics3ForConditionalGeneration(Idefics3Config(vision_config=vc, text_config=tc, scale_factor=2,
                                                            image_token_id=tm.VOCAB + 1, pad_token_id=1))
    tm.randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def save_idefics3(model, path: Path, **proc: object) -> Path:
    """The checkpoint, a tokenizer with Idefics3's special tokens, the template and the processor
    (longest edge 64, 32 px tiles: up to 2 x 2 tiles and the global image)."""
    from transformers import Idefics3ImageProcessorPil

    model.save_pretrained(path)
    save_tokenizer(path, IDEFICS3_SPECIALS, IDEFICS3_TEMPLATE)
    Idefics3ImageProcessorPil(**{"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32},
                                 **proc}).save_pretrained(path)
    return path


def hf_idefics3_processor(path: Path):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    return _hf_idefics_processor(path, Idefics3Processor, Idefics3ImageProcessorPil)


def _hf_idefics_processor(path: Path, processor_cls, image_cls):
    """Idefics3Processor or Idefics2Processor (same arguments) over the saved checkpoint."""
    return processor_cls(image_processor=image_cls.from_pretrained(path), tokenizer=hf_tokenizer(path),
                         chat_template=IDEFICS3_TEMPLATE, image_seq_len=4)


def tiny_idefics2(seed: int = 6):
    """Idefics2: SigLIP-style tower (8 px patches, a 4 x 4 position table) over frames of their own
    sizes, a 2-layer perceiver to 4 rows per frame, a 2-layer mistral."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, MistralConfig
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

    vc = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    tc = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=tm.VOCAB + 3, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, sliding_window=None)
    pc = {"hidden_size": 64, "rms_norm_eps": 1e-5, "resampler_n_latents": 4, "resampler_depth": 2,
          "resampler_n_heads": 4, "resampler_head_dim": 16, "num_key_value_heads": 2}
    model = Idefics2ForConditionalGeneration(Idefics2Config(vision_config=vc, text_config=tc, perceiver_config=pc,
                                                            image_token_id=tm.VOCAB + 1, pad_token_id=1))
    tm.randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def save_idefics2(model, path: Path, splitting: bool = True) -> Path:
    from transformers import Idefics2ImageProcessorPil

    model.save_pretrained(path)
    save_tokenizer(path, IDEFICS3_SPECIALS[:3], IDEFICS3_TEMPLATE)
    Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 48},
                              do_image_splitting=splitting).save_pretrained(path)
    return path


def hf_idefics2_processor(path: Path):
    from transformers import Idefics2ImageProcessorPil, Idefics2Processor

    return _hf_idefics_processor(path, Idefics2Processor, Idefics2ImageProcessorPil)


# What every architecture's tests do the same way: load the saved checkpoint, run the same
# one-turn chat through our code and through transformers, compare.
TEXT = "the quick brown fox"


def load_saved(tmp_path_factory, name: str, model, save, arch: str | None = None):
    """save(model, dir) into a fresh folder, then our loader on it offline: (dir, loaded)."""
    import pytest

    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import LoadOptions, VisionSpec

    path = tmp_path_factory.mktemp(name)
    save(model, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return path, load(VisionSpec(str(path), arch), LoadOptions(token_source="none"))


def checkpoint(tmp_path_factory, name: str, hf, save, hf_processor, arch: str | None = None):
    """load_saved, plus transformers' processor on the folder: (dir, model, processor, loaded)."""
    path, loaded = load_saved(tmp_path_factory, name, hf, save, arch)
    return path, hf, hf_processor(path), loaded


def our_processor(folder: Path, *registry):
    """Our image processor built from the preprocessor_config.json transformers saved in folder."""
    from mistralrs_cli.vision.processors import processor_from_config

    return processor_from_config(json.loads((folder / "preprocessor_config.json").read_text()), "test", *registry)


def processed_pairs(theirs, ours, **kw):
    """(name, ours, transformers') for each odd image: ours on our decoding, theirs on Pillow's."""
    from PIL import Image

    from mistralrs_cli.vision import images as vi

    for name, data in odd_images().items():
        yield name, ours(vi.decode(data, name).pil), theirs(Image.open(io.BytesIO(data)), return_tensors="np", **kw)


def uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(odd_images()[name]).decode()


def our_chat(loaded, names: list[str], text: str = TEXT):
    """Our (ids, images) for a one-turn chat: the odd images named, then the text."""
    from mistralrs_cli.vision.chat import chat_with_images

    parts = [{"type": "image_url", "image_url": {"url": uri(n)}} for n in names] + [{"type": "text", "text": text}]
    return chat_with_images(loaded, [{"role": "user", "content": parts}], allow_paths=False)


def hf_chat(processor, names: list[str], text: str = TEXT):
    return hf_encode(processor, text, [odd_images()[n] for n in names])


def our_logits(loaded, ids: list[int], mm, *blocks) -> np.ndarray:
    """The whole prompt in one step with the image rows (and any attention blocks) in place."""
    from mistralrs_cli.models.layers import SeqSlice

    n = len(ids)
    return loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, None)], list(range(n)),
                             input_embeds=(mm.positions.tolist(), loaded.vision.encode(mm.pixels), *blocks))


def check_ids_and_logits(hf, processor, loaded, names: list[str]):
    """Our ids equal the processor's and our logits are within 1e-4 of the model's; returns
    (ids, images, encoding) for the architecture's own checks."""
    ids, mm = our_chat(loaded, names)
    enc = hf_chat(processor, names)
    assert enc["input_ids"][0].tolist() == ids
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    assert np.abs(our_logits(loaded, ids, mm) - want).max() <= 1e-4
    return ids, mm, enc


def check_cli_greedy(path: Path, hf, processor, loaded, name: str, arch: str | None) -> None:
    """`mistralrs --image <name> vision-plain` prints transformers' greedy 8 tokens."""
    import os
    import subprocess
    import sys

    (path / f"{name}.png").write_bytes(odd_images()[name])
    want = loaded.tokenizer.decode(hf_greedy(hf, processor, TEXT, [odd_images()[name]], 8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                          "--max-tokens", "8", "--image", str(path / f"{name}.png"), "--prompt", TEXT, "vision-plain",
                          "-m", str(path), *(["-a", arch] if arch else [])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"


def typed_placeholder(loaded, processor, name: str, typed: str):
    """mistral.rs's convention, the user types <image> in the text part: our (ids, images) and
    the processor's ids for the same typed text."""
    from PIL import Image

    from mistralrs_cli.vision.chat import chat_with_images

    ids, mm = chat_with_images(loaded, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri(name)}}, {"type": "text", "text": typed}]}], allow_paths=False)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": typed}]}],
                                         add_generation_prompt=True, tokenize=False)
    enc = processor(text=text, images=[Image.open(io.BytesIO(odd_images()[name]))], add_special_tokens=False)
    return ids, mm, enc["input_ids"][0]
