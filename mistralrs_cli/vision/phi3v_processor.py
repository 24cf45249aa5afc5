"""Phi-3-vision's image processor (the checkpoint's remote Phi3VImageProcessor, "HD transform") and
its prompt conventions, in numpy and Pillow (no torch).

An image, turned so that it is at least as wide as tall, is resized (Pillow bilinear, aspect
kept) to the widest multiple of the crop size whose crop grid stays within num_crops crops, padded
with white above and below to a whole number of crop rows, and turned back. Its pixels are
rescaled to [0, 1] and normalized in float32; the global view is that whole tensor resized to one
crop by bicubic interpolation (torch's F.interpolate, align_corners=False, no antialiasing); then
come the crops, row by row. In the prompt the user writes <|image_1|>, <|image_2|>, ...; each
becomes the tokenizer's <|image|> token, which vision/prompt.py expands to the image's rows."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from .processors import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, to_rgb

TAG = re.compile(r"<\|image_(\d+)\|>")
IMAGE_TOKEN = "<|image|>"  # the tokenizer's placeholder token (id 32044 in Phi-3-V's vocabulary)


@dataclass
class Phi3VPixels:
    """One image: the global view, then the crops row by row, (1 + rows * cols, 3, crop, crop)."""

    crops: np.ndarray
    grid: tuple[int, int]  # (rows, cols) of crops


def hd_size(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int]:
    """(width, height) of the resized image before padding, for an image at least as wide as tall:
    the largest `scale` crops across whose rows (ceil(scale / ratio)) keep scale * rows <= num_crops."""
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_w = scale * crop
    return new_w, max(1, int(new_w / ratio))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bicubic resampling (a = -0.75, half-pixel centres, edge
    samples repeated, no antialiasing) along one axis."""
    a = -0.75
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def inner(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def outer(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([outer(t + 1), inner(t), inner(1 - t), outer(2 - t)], axis=1)
    cols = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 4), cols.ravel()), weights.ravel())
    return m


@dataclass
class Phi3VProcessor:
    """preprocessor_config.json of image_processor_type Phi3VImageProcessor. crop_size is ours
    (Phi-3-V fixes it at 336, its CLIP tower's input); the loader checks it against the tower."""

    num_crops: int = 1
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    crop: int = 336

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Phi3VProcessor":
        crop = d.get("crop_size", 336)
        if isinstance(crop, dict):
            crop = crop.get("height")
        n = d.get("num_crops", 1)
        for key, value in (("num_crops", n), ("crop_size", crop)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"preprocessor_config.json: {key} must be a positive integer, got {value!r}.")
        kw = {k: d[k] for k in ("image_mean", "image_std", "do_convert_rgb") if d.get(k) is not None}
        return cls(num_crops=n, crop=crop, **kw)

    def hd_image(self, img: Any) -> Any:
        """The resized, white-padded RGB image (its sides multiples of the crop size)."""
        from PIL import Image as PILImage

        turned = img.width < img.height
        if turned:
            img = img.transpose(PILImage.Transpose.TRANSPOSE)
        w, h = hd_size(img.width, img.height, self.num_crops, self.crop)
        img = img.resize((w, h), resample=PILImage.Resampling.BILINEAR)
        padded_h = -(-h // self.crop) * self.crop
        canvas = PILImage.new("RGB", (w, padded_h), (255, 255, 255))
        canvas.paste(img, (0, (padded_h - h) // 2))
        return canvas.transpose(PILImage.Transpose.TRANSPOSE) if turned else canvas

    def __call__(self, img: Any) -> Phi3VPixels:
        img = (to_rgb(img) if self.do_convert_rgb else img).convert("RGB")
        x = np.moveaxis(np.asarray(self.hd_image(img)), -1, 0).astype(np.float32) / np.float32(255)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
        c, (_, h, w) = self.crop, x.shape
        rows, cols = h // c, w // c
        glob = bicubic_matrix(h, c) @ x.astype(np.float64) @ bicubic_matrix(w, c).T  # (3, crop, crop)
        crops = x.reshape(3, rows, c, cols, c).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, c, c)
        return Phi3VPixels(np.concatenate([glob[None].astype(np.float32), crops]), (rows, cols))


def image_tokens(grid: tuple[int, int], side: int) -> int:
    """Rows of one image: the crops' merged grid (side x side per crop) with a separator ending each
    row, the global separator, the global view's side x side with its row separators. With
    Phi-3-V's side 12: (rows * cols + 1) * 144 + 1 + (rows + 1) * 12."""
    rows, cols = grid
    return (rows * cols + 1) * side * side + 1 + (rows + 1) * side


def tags_to_token(text: str) -> str:
    """The prompt's <|image_N|> tags -> the placeholder token; they must read <|image_1|>,
    <|image_2|>, ... in order, each once (as Phi-3-V's processor numbers its images)."""
    numbers = [int(m) for m in TAG.findall(text)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise UserError(f"the prompt's image tags are {', '.join(f'<|image_{n}|>' for n in numbers)}; write "
                        "<|image_1|>, <|image_2|>, ... in order, one per image.")
    return TAG.sub(lambda _: IMAGE_TOKEN, text)


def tag_image_parts(messages: list[dict]) -> list[dict]:
    """Chat messages for Phi-3-V's template (string content): each image part becomes the next
    <|image_N|> tag and a newline where it stands, unless the text already holds tags (the user
    placed the images: mistral.rs's convention), then image parts add nothing."""
    def parts(m):
        return m.get("content") if isinstance(m.get("content"), list) else []

    typed = any(isinstance(p, dict) and p.get("type") == "text" and TAG.search(p.get("text") or "")
                for m in messages for p in parts(m))
    n, out = 0, []
    for m in messages:
        if not isinstance(m.get("content"), list):
            out.append(m)
            continue
        text, after_text = "", False
        for p in m["content"]:
            if isinstance(p, dict) and p.get("type") == "text":  # text parts joined by newlines
                text += ("\n" if after_text else "") + (p.get("text") or "")
                after_text = True
            elif isinstance(p, dict) and p.get("type") in ("image", "image_url") and not typed:
                n += 1
                text, after_text = text + f"<|image_{n}|>\n", False
        out.append({**m, "content": text})
    return out


PROCESSORS: dict[str, type] = {"Phi3VImageProcessor": Phi3VProcessor}
