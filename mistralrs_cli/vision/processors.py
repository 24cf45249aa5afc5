"""Image processors equal to transformers' PIL-based ones, in numpy and Pillow (no torch).

Built from the checkpoint's preprocessor_config.json. Each step mirrors the reference's
arithmetic (uint8 resize in Pillow, rescale in float64 then float32, normalize in float32), so
the pixel tensors match transformers' to rounding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def processor_from_config(d: dict[str, Any], source: str) -> Any:
    kind = d.get("image_processor_type", "CLIPImageProcessor")
    if kind not in PROCESSORS:
        raise UserError(f"{source}: image_processor_type {kind} is not supported (supported: "
                        f"{', '.join(sorted(PROCESSORS))}).")
    return PROCESSORS[kind].from_dict(d)
