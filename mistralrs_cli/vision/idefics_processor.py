"""Idefics3's image processor and prompt text, equal to transformers' Idefics3ImageProcessorPil and
Idefics3Processor, in numpy + Pillow (no torch).

An image is resized so its longest edge is size.longest_edge, then up to multiples of
max_image_size.longest_edge, cut into square tiles of that size (row by row) followed by the whole
image squashed to one tile; each tile is rescaled and normalized. Its placeholder becomes one
`<fake_token_around_image><row_r_col_c>` + image rows block per tile and the global image's block."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .processors import ImageTooSmall, rescale_normalize, to_rgb

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized image's edges
FAKE, IMAGE, GLOBAL = "<fake_token_around_image>", "<image>", "<global-img>"


@dataclass
class IdeficsPixels:
    """One image's tiles (rows * cols, row by row) then the global image: (tiles + 1, 3, S, S);
    rows = cols = 0: the global image alone."""

    patches: np.ndarray
    rows: int
    cols: int


def _longest_edge_size(h: int, w: int, max_len: int) -> tuple[int, int]:
    """transformers' _resize_output_size_rescale_to_max_len (the short side rounded up to even),
    then capped at MAX_IMAGE_SIZE."""
    aspect = w / h
    if w >= h:
        w, h = max_len, int(max_len / aspect)
        h += h % 2
    else:
        h, w = max_len, int(max_len * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(h, 1), max(w, 1)


def _tile_multiple_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both edges up to multiples of the tile."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


@dataclass
class Idefics3Processor:
    """transformers' Idefics3ImageProcessor (PIL backend), one image at a time."""

    longest_edge: int = 4 * 364
    tile: int = 364
    do_image_splitting: bool = True
    resample: int = 1  # Lanczos
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Idefics3Processor":
        keys = ("do_image_splitting", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "do_convert_rgb")
        size = d.get("size") or {}
        tile = d.get("max_image_size") or {}
        return cls(longest_edge=int(size.get("longest_edge", 4 * 364)), tile=int(tile.get("longest_edge", 364)),
                   **{k: d[k] for k in keys if d.get(k) is not None})

    def _array(self, img: Any) -> np.ndarray:
        x = np.asarray(img)
        return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # (C, H, W) uint8

    def __call__(self, img: Any) -> IdeficsPixels:
        if self.do_convert_rgb:
            img = to_rgb(img)
        if self.do_resize:
            h, w = _longest_edge_size(img.height, img.width, self.longest_edge)
            img = img.resize((w, h), resample=self.resample)
        s, rows, cols = self.tile, 0, 0
        if not self.do_image_splitting:
            frames = [self._array(img.resize((s, s), resample=self.resample))]
        else:
            h, w = _tile_multiple_size(img.height, img.width, s)
            img = img.resize((w, h), resample=self.resample)
            if h > s or w > s:
                rows, cols = (h - s) // s + 1, (w - s) // s + 1
                x = self._array(img)
                frames = [x[:, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
                frames.append(self._array(img.resize((s, s), resample=self.resample)))
            else:
                frames = [self._array(img)]
        scale = self.rescale_factor if self.do_rescale else None
        mean = self.image_mean if self.do_normalize else None
        return IdeficsPixels(np.stack([rescale_normalize(f, scale, mean, self.image_std) for f in frames]), rows, cols)


def image_text(pixels: IdeficsPixels, seq_len: int) -> str:
    """The text Idefics3Processor puts in place of one image's `<image>` (its replace_image_token)."""
    rows = IMAGE * seq_len
    if pixels.rows == 0 and pixels.cols == 0:
        return f"{FAKE}{GLOBAL}{rows}{FAKE}"
    lines = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{rows}" for c in range(pixels.cols)) + "\n"
                    for r in range(pixels.rows))
    return f"{lines}\n{FAKE}{GLOBAL}{rows}{FAKE}"


@dataclass
class Idefics2Pixels:
    """One Idefics2 image's frames (the 4 quarters then the whole image with splitting, else the
    image), each (3, h, w) of its own size: the model pads a prompt's frames together."""

    frames: list


def _clamped_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """transformers' Idefics2 get_resize_output_image_size: shrink to the longest edge keeping the
    aspect, then raise each edge to at least the shortest edge (that does not keep it)."""
    aspect = w / h
    if w >= h and w > long:
        w, h = long, int(long / aspect)
    elif h > w and h > long:
        h, w = long, int(long * aspect)
    return max(h, short), max(w, short)


@dataclass
class Idefics2Processor(Idefics3Processor):
    """transformers' Idefics2ImageProcessor (PIL backend), one image at a time, unpadded."""

    shortest_edge: int = 378
    longest_edge: int = 980
    do_image_splitting: bool = False
    resample: int = 2  # bilinear

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Idefics2Processor":
        keys = ("do_image_splitting", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "do_convert_rgb")
        size = d.get("size") or {}
        return cls(shortest_edge=int(size.get("shortest_edge", 378)), longest_edge=int(size.get("longest_edge", 980)),
                   **{k: d[k] for k in keys if d.get(k) is not None})

    def __call__(self, img: Any) -> Idefics2Pixels:
        from PIL import Image as PILImage

        if self.do_convert_rgb:
            img = to_rgb(img)
        x = self._array(img)
        frames = [x]
        if self.do_image_splitting:
            if min(x.shape[1:]) < 2:  # a quarter would be empty (transformers divides by zero)
                raise ImageTooSmall("this Idefics2 checkpoint splits each image in four, so each side needs at "
                                    "least 2 pixels; send a larger image.")
            mh, mw = x.shape[1] // 2, x.shape[2] // 2
            frames = [x[:, :mh, :mw], x[:, :mh, mw:], x[:, mh:, :mw], x[:, mh:, mw:], x]
        if self.do_resize:
            pils = [PILImage.fromarray(np.moveaxis(f, 0, -1)) for f in frames]
            frames = [self._array(p.resize(_clamped_size(p.height, p.width, self.shortest_edge, self.longest_edge)[::-1],
                                           resample=self.resample)) for p in pils]
        scale = self.rescale_factor if self.do_rescale else None
        mean = self.image_mean if self.do_normalize else None
        return Idefics2Pixels([rescale_normalize(f, scale, mean, self.image_std) for f in frames])


def idefics2_text(text: str, seq_len: int, frames: int) -> str:
    """Idefics2Processor's text edit: each <image> becomes its frames' rows between fake tokens,
    adjacent images share one fake token, and a word right after an image gets a space."""
    import re

    block = f"{FAKE}{IMAGE * seq_len}{FAKE}" * frames
    text = text.replace(IMAGE, block).replace(FAKE + FAKE, FAKE)
    return re.sub(rf"{re.escape(FAKE)}(?=[^\s<])", f"{FAKE} ", text)


PROCESSORS = {"Idefics3ImageProcessor": Idefics3Processor, "Idefics3ImageProcessorFast": Idefics3Processor,
              "Idefics2ImageProcessor": Idefics2Processor, "Idefics2ImageProcessorFast": Idefics2Processor}
