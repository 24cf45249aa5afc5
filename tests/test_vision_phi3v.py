"""vision-plain -a phi3v (Phi-3-vision, config.json model_type "phi3_v"). transformers has no
Phi3V class, so the reference is assembled here from transformers parts and the published
architecture (the checkpoint's remote image_processing_phi3_v.py / image_embedding_phi3_v.py):
a tiny random CLIPVisionModel and Phi3ForCausalLM saved under Phi-3-V's weight names with random
glb_GN / sub_GN / img_projection, a config.json and preprocessor_config.json shaped as Phi-3-V
ships them (scaled down: 56 px crops of 14 px patches, 2 x 2 merged rows per crop, up to 4 crops).
Checked: crops against PIL + numpy (+ torch's bicubic for the global view) on five odd images;
token counts against the published formula; logits against transformers' CLIP hidden states,
the HD assembly written below in plain torch, and Phi3ForCausalLM on inputs_embeds (one and two
images); greedy text through the CLI, the Python API and the server (openai client) against a
greedy loop over that reference; bad prompts as one error."""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models as tm
import vision_models as vm

CROP, PATCH, NUM_CROPS = 56, 14, 4
SIDE = CROP // PATCH // 2  # merged rows per crop side (12 in Phi-3-V)
SPECIALS = ["<|user|>", "<|end|>", "<|assistant|>", "<|image|>"]
# Phi-3-vision-128k-instruct's chat template (string content only)
TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
            "{{- '<|assistant|>\n' -}}{% endif %}")
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build(path: Path) -> dict:
    """The checkpoint in `path`; returns the reference parts (transformers modules and tensors)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=CROP, patch_size=PATCH)).eval()
    text_cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=tm.VOCAB + len(SPECIALS), max_position_embeddings=4096,
                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0,
                    eos_token_id=1, pad_token_id=1, sliding_window=None)
    text = Phi3ForCausalLM(Phi3Config(**text_cfg)).eval()
    tm.randomize_(clip, 11, std=0.15, norm_center=1.0)
    tm.randomize_(text, 12, std=0.15, norm_center=1.0)
    g = torch.Generator().manual_seed(13)
    d = 4 * 128
    extra = {"glb_GN": torch.randn(1, 1, d, generator=g), "sub_GN": torch.randn(1, 1, 1, d, generator=g),
             "img_projection.0.weight": 0.05 * torch.randn(64, d, generator=g),
             "img_projection.0.bias": 0.1 * torch.randn(64, generator=g),
             "img_projection.2.weight": 0.15 * torch.randn(64, 64, generator=g),
             "img_projection.2.bias": 0.1 * torch.randn(64, generator=g)}
    tensors = {k: v.contiguous() for k, v in text.state_dict().items()}
    tower = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}  # hub: under vision_model.
    tensors |= {f"model.vision_embed_tokens.img_processor.vision_model.{k}": v.contiguous() for k, v in tower.items()}
    tensors |= {f"model.vision_embed_tokens.{k}": v for k, v in extra.items()}
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "attention_dropout": 0.0,
              "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                             "use_hd_transform": True, "with_learnable_separator": True},
              "embd_pdrop": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
              "img_processor": {"image_dim_out": 128, "model_name": "openai/clip-vit-large-patch14-336",
                                "name": "clip_vision_model", "num_img_tokens": SIDE * SIDE},
              "original_max_position_embeddings": 4096, "rope_scaling": None, "torch_dtype": "float32",
              **text_cfg}
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "image_mean": MEAN, "image_std": STD, "image_processor_type": "Phi3VImageProcessor",
        "num_crops": NUM_CROPS, "num_img_tokens": SIDE * SIDE, "processor_class": "Phi3VProcessor",
        "crop_size": CROP}))
    vm.save_tokenizer(path, SPECIALS, TEMPLATE, add_bos_token=True)
    return {"clip": clip, "text": text, **extra}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    ref = {}
    path, loaded = vm.load_saved(tmp_path_factory, "phi3v", None, lambda _, p: ref.update(build(p)))
    return path, ref, loaded


# ---- the reference: Phi-3-V's published processing, written out independently ----

def ref_pixels(data: bytes, num_crops: int = NUM_CROPS, crop: int = CROP) -> tuple[np.ndarray, tuple[int, int]]:
    """HD transform with PIL, rescale/normalize with numpy, the global view with torch's bicubic."""
    import torch.nn.functional as F
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img)
    img = img.convert("RGB")
    w, h = img.size
    flip = w < h
    if flip:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        w, h = img.size
    ratio, scale = w / h, 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * crop
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    target = math.ceil(new_h / crop) * crop
    top = int((target - new_h) / 2)
    arr = np.full((target, new_w, 3), 255, dtype=np.uint8)
    arr[top:top + new_h] = np.asarray(img)
    if flip:
        arr = arr.transpose(1, 0, 2)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    glob = F.interpolate(x[None], size=(crop, crop), mode="bicubic", align_corners=False)[0]
    hh, ww = x.shape[1] // crop, x.shape[2] // crop
    crops = [x[:, i * crop:(i + 1) * crop, j * crop:(j + 1) * crop] for i in range(hh) for j in range(ww)]
    return torch.stack([glob, *crops]).numpy(), (hh, ww)


def formula(grid: tuple[int, int], side: int = SIDE) -> int:
    """image_processing_phi3_v.py's count, (h//336 * w//336 + 1) * 144 + 1 + (h//336 + 1) * 12, at side."""
    return (grid[0] * grid[1] + 1) * side * side + 1 + (grid[0] + 1) * side


def ref_features(ref: dict, crops: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's penultimate hidden states without CLS, 2 x 2 merged, sub crops then glb_GN then the
    global view, sub_GN ending every row, through Linear-GELU-Linear."""
    with torch.no_grad():
        hs = ref["clip"](pixel_values=torch.from_numpy(crops), output_hidden_states=True).hidden_states[-2][:, 1:]
        n, length, dim = hs.shape
        s = int(length ** 0.5) // 2
        merged = torch.stack([torch.cat([hs[k].view(2 * s, 2 * s, dim)[2 * r + a, 2 * c + b]
                                         for a in (0, 1) for b in (0, 1)])
                              for k in range(n) for r in range(s) for c in range(s)]).view(n, s, s, 4 * dim)
        sub = ref["sub_GN"].view(-1)
        rows_out = []
        hh, ww = grid
        for gr in range(hh):
            for r in range(s):
                rows_out += [merged[1 + gr * ww + gc, r, c] for gc in range(ww) for c in range(s)] + [sub]
        rows_out.append(ref["glb_GN"].view(-1))
        for r in range(s):
            rows_out += [merged[0, r, c] for c in range(s)] + [sub]
        x = torch.stack(rows_out)
        x = torch.nn.functional.gelu(x @ ref["img_projection.0.weight"].T + ref["img_projection.0.bias"])
        return x @ ref["img_projection.2.weight"].T + ref["img_projection.2.bias"]


def ref_prompt(path: Path, ref: dict, names: list[str], text: str = vm.TEXT) -> tuple[list[int], torch.Tensor]:
    """Phi3VProcessor's way: the text split at the <|image_N|> tags, each piece tokenized, each tag
    replaced by its image's count of <|image|> ids; and the image rows in order."""
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(names)))
    prompt = f"<s><|user|>\n{tags}{text}<|end|>\n<|assistant|>\n"
    hf_tok = vm.hf_tokenizer(path)
    pieces = re.split(r"<\|image_\d+\|>", prompt)
    image_id = hf_tok.convert_tokens_to_ids("<|image|>")
    ids, feats = [], []
    for k, piece in enumerate(pieces):
        ids += hf_tok(piece, add_special_tokens=False)["input_ids"]
        if k < len(names):
            crops, grid = ref_pixels(vm.odd_images()[names[k]])
            ids += [image_id] * formula(grid)
            feats.append(ref_features(ref, crops, grid))
    return ids, torch.cat(feats)


def ref_logits(ref: dict, ids: list[int], image_id: int, feats: torch.Tensor, more: list[int] = ()) -> torch.Tensor:
    """Phi3ForCausalLM on the prompt's embeddings with its image rows replaced, then `more` tokens."""
    with torch.no_grad():
        emb = ref["text"].get_input_embeddings()(torch.tensor([[*ids, *more]])).clone()
        emb[0, :len(ids)][torch.tensor(ids) == image_id] = feats
        return ref["text"](inputs_embeds=emb).logits[0]


# ---- the checks ----

def test_crops_match_reference(phi):
    path = phi[0]
    from mistralrs_cli.vision import images as vi
    from mistralrs_cli.vision.phi3v_processor import PROCESSORS

    ours = vm.our_processor(path, PROCESSORS)

    for name, data in vm.odd_images().items():
        got = ours(vi.decode(data, name).pil)
        want, grid = ref_pixels(data)
        assert got.grid == grid, name
        assert got.crops.shape == want.shape, name
        assert np.abs(got.crops - want).max() <= 1e-5, name


def test_token_counts_follow_the_published_formula(phi):
    from PIL import Image

    from mistralrs_cli.vision.phi3v_processor import Phi3VProcessor, image_tokens

    _, _, loaded = phi
    for name, data in vm.odd_images().items():
        px = loaded.vision.processor(Image.open(io.BytesIO(data)))
        assert loaded.vision.model.tokens_for(px) == formula(ref_pixels(data)[1]), name
    # the released sizes: 336 px crops, 16 at most, 12 x 12 merged rows each
    full = Phi3VProcessor(num_crops=16)
    for (w, h), want in {(1000, 666): 1921, (336, 336): 2509, (50, 8000): None}.items():
        grid = full(Image.new("RGB", (w, h))).grid
        assert image_tokens(grid, 12) == (grid[0] * grid[1] + 1) * 144 + 1 + (grid[0] + 1) * 12
        assert want is None or image_tokens(grid, 12) == want
        assert grid[0] * grid[1] <= 16


@pytest.mark.parametrize("names", [["tall"], ["wide", "gray"]])
def test_ids_and_logits_match_reference(phi, names):
    path, ref, loaded = phi
    ids, mm = vm.our_chat(loaded, names)
    want_ids, feats = ref_prompt(path, ref, names)
    assert ids == want_ids
    want = ref_logits(ref, ids, loaded.vision.image_token_id, feats).numpy()
    assert np.abs(vm.our_logits(loaded, ids, mm) - want).max() <= 1e-4


def test_typed_tags_equal_image_parts(phi):
    """mistral.rs's convention: <|image_1|> typed in the text places the image part's image."""
    from mistralrs_cli.vision.chat import chat_with_images

    _, _, loaded = phi
    ids, _ = vm.our_chat(loaded, ["rgba"])
    typed, _ = chat_with_images(loaded, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": vm.uri("rgba")}},
        {"type": "text", "text": "<|image_1|>\n" + vm.TEXT}]}], allow_paths=False)
    assert typed == ids


def test_bad_tags_are_user_errors(phi):
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.vision.chat import chat_with_images

    _, _, loaded = phi
    cases = {"<|image_1|>\n" + vm.TEXT: (["rgba", "gray"], "1 image placeholder"),  # more images than tags
             "<|image_2|><|image_1|> hi": (["rgba", "gray"], "in order"),
             "<|image_1|> hi": ([], "0 image")}  # a tag without its image
    for text, (names, msg) in cases.items():
        parts = [{"type": "image_url", "image_url": {"url": vm.uri(n)}} for n in names]
        with pytest.raises(UserError, match=msg):
            chat_with_images(loaded, [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
                             allow_paths=False)


def _cli(path: Path, images: list[str], prompt: str, arch: str, *extra: str):
    for n in images:
        (path / f"{n}.png").write_bytes(vm.odd_images()[n])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    args = [a for n in images for a in ("--image", str(path / f"{n}.png"))]
    return subprocess.run([str(Path(sys.executable).with_name("mistralrs")), "--temperature", "0", "--ignore-eos",
                           "--max-tokens", "8", *args, "--prompt", prompt, *extra, "vision-plain", "-m", str(path),
                           "-a", arch], env=env, capture_output=True, text=True, timeout=300)


def ref_greedy(path: Path, ref: dict, loaded, names: list[str], n: int = 8) -> str:
    """The reference's greedy text (the whole sequence re-run each step, end tokens ignored)."""
    ids, feats = ref_prompt(path, ref, names)
    out: list[int] = []
    for _ in range(n):
        out.append(int(ref_logits(ref, ids, loaded.vision.image_token_id, feats, out)[-1].argmax()))
    return loaded.tokenizer.decode(out)


def test_cli_greedy_matches_reference_and_bad_input_is_one_line(phi):
    path, ref, loaded = phi
    res = _cli(path, ["wide"], vm.TEXT, "phi3v")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ref_greedy(path, ref, loaded, ["wide"]) + "\n"
    bad = _cli(path, ["wide", "gray"], "<|image_1|>\nwhat is this", "phi3_v")
    assert bad.returncode != 0 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--image" in lines[0], bad.stderr


def test_api_and_server_greedy_match_reference(phi):
    """Two images: the Python API's image parts and the server's data: URIs (official openai client)."""
    from test_server import serve

    from mistralrs_cli import ChatCompletionRequest, Runner, VisionArchitecture, Which

    path, ref, loaded = phi
    want = ref_greedy(path, ref, loaded, ["tall", "gray"])
    content = [{"type": "image_url", "image_url": {"url": vm.uri(n)}} for n in ("tall", "gray")]
    content.append({"type": "text", "text": vm.TEXT})
    runner = Runner(Which.VisionPlain(str(path), arch=VisionArchitecture.Phi3V), token_source="none", loaded=loaded)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0.0, ignore_eos=True))
    assert res.choices[0].message.content == want
    with serve(loaded) as srv:
        got = srv.client.chat.completions.create(model="phi3v", messages=[{"role": "user", "content": content}],
                                                 max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want
