"""A forward pass's flattened batch: every token of every scheduled sequence, with positions.

torch-free: the engine builds it for the torch models and the native runtime alike."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeqSlice:
    start: int  # rows of this sequence in the flattened batch
    end: int
    cache: Any  # None: no cache (the whole sequence is in this batch)


@dataclass
class Batch:
    positions: Any  # (T,) int64: a torch tensor for the torch models, numpy for the native runtime
    seqs: list[SeqSlice]
    logits_rows: Any = None  # rows whose logits are wanted (None: all)
    # per-forward memo shared by all layers: rotary tables by frequency vector, masks by window
    memo: dict[Any, Any] = field(default_factory=dict)
    # LoRA / X-LoRA: (n_layers, T, n_adapters) float32 weight of each adapter for each row, or None
    # (no adapter on any row); see adapters/bank.py
    adapter_weights: Any = None
    # vision: (rows (K,), vectors (K, hidden)): these rows' input embeddings are the given vectors
    # (image features) in place of their tokens' embeddings; None: every row embeds its token
    input_embeds: Any = None
    # vision (Gemma 3): {sequence index: [(start, end) positions]}: each span's rows attend to each
    # other both ways (an image's rows); None: causal everywhere
    image_blocks: Any = None
