"""A prompt's images: each placeholder token expanded into the image's rows, and the rows the
engine replaces with image features. torch-free (the model's encoder is called through Vision)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import UserError


@dataclass
class PromptImages:
    """positions: the prompt positions whose input rows are image features, in order (image by
    image); features: (len(positions), hidden) once encoded (the engine encodes on first need)."""

    positions: np.ndarray
    pixels: list[np.ndarray]
    digests: tuple[str, ...]
    features: Any = None

    def rows(self, start: int, n: int, batch_start: int, encode: Callable[[list], Any]):
        """The batch rows and feature rows of positions [start, start + n), or None if none."""
        lo, hi = np.searchsorted(self.positions, [start, start + n])
        if lo == hi:
            return None
        if self.features is None:
            self.features = encode(self.pixels)
        return (self.positions[lo:hi] - start + batch_start).tolist(), self.features[lo:hi]


@dataclass
class Vision:
    """Loaded.vision: what turns images into a prompt's rows. `model` maps pixels (N, C, H, W) to
    features (N, tokens_per_image, hidden) (a torch module: models/llava.py ...)."""

    model: Any
    processor: Callable[[Any], np.ndarray]
    image_token_id: int
    image_token: str  # the placeholder text the template (or a user) writes
    tokens_per_image: int  # per image, unless the model's tokens_for(pixels) says (anyres)
    arch: str
    max_images: int | None = None
    dtype: Any = None  # the text model's activation dtype
    allow_local_images: bool = False  # --allow-local-images: URLs may reach private addresses
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self, pixels: list[np.ndarray]):
        import torch

        with torch.inference_mode():
            if hasattr(self.model, "encode_images"):  # images of different token counts (anyres)
                feats = self.model.encode_images(pixels)
            else:
                x = torch.from_numpy(np.stack(pixels))
                feats = self.model(x.to(next(self.model.parameters()).dtype))  # (N, tokens, hidden)
            return feats.reshape(-1, feats.shape[-1]).to(self.dtype or feats.dtype)

    def expand(self, ids: list[int], images: list, where: str) -> tuple[list[int], PromptImages | None]:
        """Each placeholder token in `ids` becomes tokens_per_image image rows; the count of
        placeholders must equal the count of images."""
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise UserError(f"{where}: the prompt has {len(slots)} image placeholder(s) ({self.image_token}) "
                            f"for {len(images)} image(s); give each image one placeholder (the chat "
                            f"template places them for image parts).")
        if self.max_images is not None and len(images) > self.max_images:
            raise UserError(f"{where}: {len(images)} images, but this {self.arch} model takes at most "
                            f"{self.max_images} per prompt.")
        if not images:
            return ids, None
        pixels = [self.processor(img.pil) for img in images]
        counts = [self.model.tokens_for(p) if hasattr(self.model, "tokens_for") else self.tokens_per_image
                  for p in pixels]
        out: list[int] = []
        positions: list[int] = []
        prev = 0
        for slot, n in zip(slots, counts):
            out.extend(ids[prev:slot])
            positions.extend(range(len(out), len(out) + n))
            out.extend([self.image_token_id] * n)
            prev = slot + 1
        out.extend(ids[prev:])
        return out, PromptImages(np.asarray(positions, dtype=np.int64), pixels,
                                 tuple(img.digest for img in images))
