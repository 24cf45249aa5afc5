"""The rows of one forward pass whose input embeddings are image features (vision models).

A request's features are computed once, the first time a chunk of its prompt reaches an image
row (vision/prompt.py PromptImages.rows); a prefix-cache hit past the images skips the encoder."""
from __future__ import annotations

from typing import Any


class ImageRows:
    def __init__(self, vision: Any):
        self.vision = vision
        self.rows: list[int] = []
        self.parts: list[Any] = []
        self.blocks: dict[int, list[tuple[int, int]]] = {}  # sequence -> spans seen both ways

    def add(self, images: Any, start: int, n: int, batch_start: int, seq: int) -> None:
        """The image rows among prompt positions [start, start + n) of one request's chunk (the
        batch's sequence `seq`)."""
        if images is None:
            return
        found = images.rows(start, n, batch_start, self.vision.encode)
        if found is not None:
            self.rows.extend(found[0])
            self.parts.append(found[1])
        spans = images.blocks(start, n)
        if spans:
            self.blocks[seq] = spans

    def __bool__(self) -> bool:
        return bool(self.rows)

    def joined(self) -> tuple:
        """(rows, their vectors), and the bidirectional spans by sequence when there are any."""
        import torch

        vectors = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        return (self.rows, vectors, self.blocks) if self.blocks else (self.rows, vectors)
