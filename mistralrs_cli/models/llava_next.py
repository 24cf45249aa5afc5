"""LLaVA-NeXT / LLaVA 1.6 (transformers' LlavaNextForConditionalGeneration): LLaVA's CLIP tower
and projector run on every tile of the "anyres" grid (vision/processors.py LlavaNextProcessor);
the tiles' features are laid out as the grid, the padding rows/columns cut off, and a learned
newline vector ends each row, after the whole-image tile's features."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vision.processors import AnyresPixels, select_best_resolution
from .llava import LlavaVision


def unpadded_grid(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature grid (rows x cols) that the image covers
    (transformers' unpad_image: the padding added around the resized image, in features)."""
    h, w = size
    if w / h > cols / rows:
        new_h = int(round(h * (cols / w), 7))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = int(round(w * (rows / h), 7))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


class LlavaNextVision(LlavaVision):
    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__(raw, text_hidden)
        self.pinpoints = [list(p) for p in raw.get("image_grid_pinpoints") or []]
        self.image_newline = nn.Parameter(torch.empty(text_hidden))

    def state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = super().state(weights)
        newline = weights.get("image_newline", weights.get("model.image_newline"))
        return sd if newline is None else sd | {"image_newline": newline}

    def _grid(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(tile rows, tile columns, features per tile side) of an image of this size."""
        th, tw = select_best_resolution(size, self.pinpoints)
        tile = self.vcfg.image_size
        return th // tile, tw // tile, self.vcfg.image_size // self.vcfg.patch_size

    def tokens_for(self, px: AnyresPixels) -> int:
        rows, cols, side = self._grid(px.size)
        top, bottom, left, right = unpadded_grid(px.size, rows * side, cols * side)
        return side * side + (bottom - top) * (right - left + 1)

    def encode_images(self, pixels: list[AnyresPixels]) -> torch.Tensor:
        """-> (sum of tokens_for, text hidden): per image the whole-image tile's features, then
        the grid's rows, each followed by the newline vector."""
        out = []
        for px in pixels:
            feats = self(torch.from_numpy(px.patches).to(self.image_newline.dtype))  # (tiles, side*side, D)
            rows, cols, side = self._grid(px.size)
            grid = feats[1:].view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4)  # (rows, side, cols, side, D)
            grid = grid.reshape(rows * side, cols * side, -1)
            top, bottom, left, right = unpadded_grid(px.size, rows * side, cols * side)
            grid = grid[top:bottom, left:right]
            nl = self.image_newline.expand(grid.shape[0], 1, -1)
            out += [feats[0], torch.cat([grid, nl], dim=1).reshape(-1, grid.shape[-1])]
        return torch.cat(out)
