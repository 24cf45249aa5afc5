"""A prompt's images: each placeholder token expanded into the image's rows, and the rows the
engine replaces with image features. torch-free (the model's encoder is called through Vision)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from .processors import ImageTooSmall


@dataclass
class PromptImages:
    """positions: the prompt positions whose input rows are image features, in order (image by
    image); features: (len(positions), hidden) once encoded (the engine encodes on first need)."""

    positions: np.ndarray
    pixels: list[np.ndarray]
    digests: tuple[str, ...]
    features: Any = None
    spans: list[tuple[int, int]] | None = None  # each image's positions, when they attend both ways

    def blocks(self, start: int, n: int) -> list[tuple[int, int]]:
        """The bidirectional spans that reach into positions [start, start + n)."""
        return [(a, b) for a, b in self.spans or () if a < start + n and b > start]

    def chunk(self, start: int, n: int) -> int:
        """A prefill chunk [start, start + n) cut (or stretched) so that it does not end inside
        a bidirectional span: the span's first rows must see its last ones."""
        for a, b in self.spans or ():
            if a < start + n < b:
                return a - start if a > start else b - start
        return n

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
    # Gemma 3: the processor writes each image's rows into the text (this string replaces the
    # placeholder before tokenizing), and an image's rows attend to each other both ways
    text_expansion: str | None = None
    bidirectional: bool = False
    # Idefics: the ids one image's placeholder becomes (its tiles' markers and rows; those equal to
    # image_token_id are its feature rows); None: tokens_per_image image tokens
    image_ids: Callable[[Any], list[int]] | None = None
    # Idefics2: the processor's own edit of the prompt text (each placeholder -> runs_per_image runs
    # of tokens_per_image image tokens between fake tokens), applied before tokenizing
    text_rewrite: Callable[[str], str] | None = None
    runs_per_image: int = 1
    # Phi-3-V: the user's numbered tags (<|image_1|> ...) -> the placeholder token, before the rest
    tag_rewrite: Callable[[str], str] | None = None

    def prepare_text(self, text: str) -> str:
        """The rendered prompt as it is tokenized."""
        if self.tag_rewrite is not None:
            text = self.tag_rewrite(text)
        if self.text_rewrite is not None:
            return self.text_rewrite(text)
        return text if self.text_expansion is None else text.replace(self.image_token, self.text_expansion)

    def slots(self, ids: list[int]) -> list[int]:
        """Where each image goes: its placeholder token, or (text-expanded) the start of its rows."""
        if self.text_expansion is None and self.text_rewrite is None:
            return [i for i, t in enumerate(ids) if t == self.image_token_id]
        starts = [i for i, t in enumerate(ids) if t == self.image_token_id and (i == 0 or ids[i - 1] != t)]
        return starts[::self.runs_per_image]
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
        slots = self.slots(ids)
        if len(slots) != len(images):
            raise UserError(f"{where}: the prompt has {len(slots)} image placeholder(s) ({self.image_token}) "
                            f"for {len(images)} image(s); give each image one placeholder (the chat "
                            f"template places them for image parts).")
        if self.max_images is not None and len(images) > self.max_images:
            raise UserError(f"{where}: {len(images)} images, but this {self.arch} model takes at most "
                            f"{self.max_images} per prompt.")
        if not images:
            return ids, None
        pixels = []
        for i, img in enumerate(images):
            try:
                pixels.append(self.processor(img.pil))
            except ImageTooSmall as e:
                w, h = img.pil.size
                raise UserError(f"{where}: image {i + 1} is {w}x{h} pixels; {e}") from None
        if self.text_rewrite is not None:
            return ids, self._rewritten(ids, images, pixels, where)
        counts = [self.model.tokens_for(p) if hasattr(self.model, "tokens_for") else self.tokens_per_image
                  for p in pixels]
        out: list[int] = []
        positions: list[int] = []
        prev = 0
        for slot, n, p in zip(slots, counts, pixels):
            if self.text_expansion is not None:  # already n rows (checked)
                if ids[slot:slot + n] != [self.image_token_id] * n or ids[slot + n:slot + n + 1] == [self.image_token_id]:
                    raise UserError(f"{where}: an image's rows ({self.image_token_id}) were cut or typed by hand; "
                                    f"write {self.image_token} once per image.")
                positions.extend(range(slot, slot + n))
                continue
            out.extend(ids[prev:slot])
            seg = [self.image_token_id] * n if self.image_ids is None else self.image_ids(p)
            positions.extend(len(out) + j for j, t in enumerate(seg) if t == self.image_token_id)
            out.extend(seg)
            prev = slot + 1
        out = list(ids) if self.text_expansion is not None else out + ids[prev:]
        spans = None
        if self.bidirectional:
            starts = np.cumsum([0, *counts])
            spans = [(positions[starts[k]], positions[starts[k]] + c) for k, c in enumerate(counts)]
        return out, PromptImages(np.asarray(positions, dtype=np.int64), pixels,
                                 tuple(img.digest for img in images), spans=spans)

    def _rewritten(self, ids: list[int], images: list, pixels: list, where: str) -> PromptImages:
        """Idefics2: the text already holds every image's rows; they are all of its image tokens."""
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(images) * self.runs_per_image * self.tokens_per_image:
            raise UserError(f"{where}: the image rows ({self.image_token}) were cut or typed by hand; write "
                            f"{self.image_token} once per image.")
        return PromptImages(np.asarray(positions, dtype=np.int64), pixels, tuple(img.digest for img in images))
