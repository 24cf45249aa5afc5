"""Image processors equal to transformers' PIL-based ones, in numpy and Pillow (no torch).

Built from the checkpoint's preprocessor_config.json. Each step mirrors the reference's
arithmetic (uint8 resize in Pillow, rescale in float64 then float32, normalize in float32), so
the pixel tensors match transformers' to rounding."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTooSmall(ValueError):
    """An image a processor cannot take at its size; the message says what it needs."""


def to_rgb(img: Any) -> Any:
    """Transparency is composited onto white, as transformers' convert_to_rgb does."""
    from PIL import Image as PILImage

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = PILImage.new("RGBA", img.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side `size` (torchvision's rule: the long side truncated)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, H, W) -> (C, h, w) around the centre; a smaller image is zero-padded around it."""
    c, H, W = x.shape
    top, left = (H - h) // 2, (W - w) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + h, left:left + w]
    out = np.zeros((c, max(h, H), max(w, W)), dtype=x.dtype)
    pt, pl = -(-(out.shape[1] - H) // 2), -(-(out.shape[2] - W) // 2)
    out[:, pt:pt + H, pl:pl + W] = x
    return center_crop(out, h, w)


def rescale_normalize(x: np.ndarray, scale: float | None, mean: Any, std: Any) -> np.ndarray:
    if scale is not None:
        x = (x.astype(np.float64) * scale).astype(np.float32)
    elif not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if mean is not None:
        m, s = np.asarray(mean, dtype=x.dtype), np.asarray(std, dtype=x.dtype)
        x = ((x.T - m) / s).T
    return x


@dataclass
class CLIPProcessor:
    """transformers' CLIPImageProcessor: RGB, resize (shortest edge), center crop, rescale, normalize."""

    size: dict
    crop_size: dict | None
    resample: int = 3  # bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPProcessor":
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        keys = ("resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "do_convert_rgb")
        return cls(size, crop, **{k: d[k] for k in keys if d.get(k) is not None})

    def resize(self, img: Any) -> Any:
        h, w = img.height, img.width
        if "shortest_edge" in self.size:
            h, w = shortest_edge_size(h, w, int(self.size["shortest_edge"]))
        elif "height" in self.size and "width" in self.size:
            h, w = int(self.size["height"]), int(self.size["width"])
        else:
            raise UserError(f"preprocessor_config.json: size {self.size} is not supported (shortest_edge, "
                            "or height and width).")
        return img.resize((w, h), resample=self.resample)

    def __call__(self, img: Any) -> np.ndarray:
        """A Pillow image -> (3, H, W) float32 pixels."""
        if self.do_convert_rgb:
            img = to_rgb(img)
        if self.do_resize:
            img = self.resize(img)
        x = np.asarray(img)
        x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # (C, H, W)
        if self.do_center_crop:
            x = center_crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        return rescale_normalize(x, self.rescale_factor if self.do_rescale else None,
                                 self.image_mean if self.do_normalize else None, self.image_std)


# preprocessor_config.json image_processor_type -> class
PROCESSORS: dict[str, type] = {"CLIPImageProcessor": CLIPProcessor, "CLIPImageProcessorFast": CLIPProcessor}


def processor_from_config(d: dict[str, Any], source: str, extra: dict[str, type] | None = None) -> Any:
    """extra: more image_processor_type -> class (those of modules that build on this one: Idefics')."""
    kind = d.get("image_processor_type", "CLIPImageProcessor")
    known = PROCESSORS | (extra or {})
    if kind not in known:
        raise UserError(f"{source}: image_processor_type {kind} is not supported (supported: "
                        f"{', '.join(sorted(known))}).")
    return known[kind].from_dict(d)


@dataclass
class AnyresPixels:
    """LLaVA-NeXT's pixels of one image: the whole image resized, then its tiles; and its size."""

    patches: np.ndarray  # (1 + tiles, 3, crop, crop) float32
    size: tuple[int, int]  # the original (height, width)


def select_best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The grid resolution that keeps most of the image's pixels, then wastes least (transformers')."""
    h, w = size
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def _fit_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


@dataclass
class LlavaNextProcessor(CLIPProcessor):
    """transformers' LlavaNextImageProcessor ("anyres"): the image resized into the best grid
    resolution, zero-padded around it, cut into crop-sized tiles; the whole image squashed to one
    tile goes first; each tile then goes through CLIPProcessor's steps."""

    image_grid_pinpoints: list = None  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaNextProcessor":
        base = CLIPProcessor.from_dict(d)
        pins = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        return cls(**{**base.__dict__, "image_grid_pinpoints": [list(p) for p in pins]})

    def tile(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image as PILImage

        img = PILImage.fromarray(np.moveaxis(x, 0, -1)) if x.shape[0] == 3 else PILImage.fromarray(x[0])
        if self.do_resize:
            img = self.resize(img)
        y = np.asarray(img)
        y = y[None] if y.ndim == 2 else np.moveaxis(y, -1, 0)
        if self.do_center_crop:
            y = center_crop(y, int(self.crop_size["height"]), int(self.crop_size["width"]))
        return rescale_normalize(y, self.rescale_factor if self.do_rescale else None,
                                 self.image_mean if self.do_normalize else None, self.image_std)

    def __call__(self, img: Any) -> AnyresPixels:
        if self.do_convert_rgb:
            img = to_rgb(img)
        size = (img.height, img.width)
        th, tw = select_best_resolution(size, self.image_grid_pinpoints)
        nh, nw = _fit_size(img.height, img.width, th, tw)
        x = np.moveaxis(np.asarray(img.resize((nw, nh), resample=self.resample)), -1, 0)
        top, left = (th - nh) // 2, (tw - nw) // 2
        padded = np.zeros((x.shape[0], th, tw), dtype=x.dtype)
        padded[:, top:top + nh, left:left + nw] = x
        edge = self.size.get("height") or self.size["shortest_edge"]
        squash = (self.size.get("height") or edge, self.size.get("width") or edge)
        whole = np.moveaxis(np.asarray(img.resize((squash[1], squash[0]), resample=self.resample)), -1, 0)
        p = int(self.crop_size["height"])
        tiles = [padded[:, i:i + p, j:j + p] for i in range(0, th, p) for j in range(0, tw, p)]
        return AnyresPixels(np.stack([self.tile(t) for t in [whole, *tiles]]), size)


@dataclass
class SiglipProcessor(CLIPProcessor):
    """transformers' SiglipImageProcessor / Gemma3ImageProcessor: RGB, resize to height x width,
    rescale, normalize; no crop. (Gemma 3's pan-and-scan crops are not supported.)"""

    do_center_crop: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiglipProcessor":
        if d.get("do_pan_and_scan"):
            raise UserError("preprocessor_config.json: do_pan_and_scan is not supported; set it to false.")
        return cls(**{**CLIPProcessor.from_dict({"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, "resample": 2,
                                                 **d}).__dict__, "do_center_crop": False})


PROCESSORS |= {"LlavaNextImageProcessor": LlavaNextProcessor, "LlavaNextImageProcessorFast": LlavaNextProcessor,
               "Gemma3ImageProcessor": SiglipProcessor, "Gemma3ImageProcessorFast": SiglipProcessor,
               "SiglipImageProcessor": SiglipProcessor, "SiglipImageProcessorFast": SiglipProcessor}
