"""Idefics3 (transformers' Idefics3ForConditionalGeneration, SmolVLM's layout): a SigLIP tower
encodes each tile of an image (vision/idefics_processor.py cuts them), the connector's pixel
shuffle folds scale_factor x scale_factor neighbouring patches into one row and a linear
projection maps it into the registered text model's (llama's) input. The text model runs as
`plain` runs it, causal everywhere."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..vision.clip import VisionConfig, vision_weights
from ..vision.idefics_processor import image_text
from ..vision.siglip import SiglipEmbeddings, SiglipVisionTower

TOWER_PREFIXES = ("model.vision_model.", "vision_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")
# Idefics3VisionConfig's defaults (a saved config.json may leave them out)
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 32,
                   "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, side * side, D) -> (B, side * side / scale², D * scale²), transformers' order."""
    b, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.reshape(b, side, side // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(b, side // scale, side // scale, d * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(b, seq // (scale * scale), d * scale * scale)


def bucket_positions(side: int) -> torch.Tensor:
    """The position ids transformers' Idefics3VisionEmbeddings gives a full tile's patches: its
    float32 bucketize, which for some sides (19, 25, 29, ...) is not 0..side²-1."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    frac = (torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor([side]))).clamp(max=1.0 - 1e-6)
    b = torch.bucketize(frac, boundaries, right=True)
    return (b[:, None] * side + b[None, :]).reshape(-1)


class Idefics3Embeddings(SiglipEmbeddings):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.register_buffer("positions", bucket_positions(cfg.image_size // cfg.patch_size), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        return patches + self.position_embedding(self.positions)


class Idefics3Connector(nn.Module):
    def __init__(self, d_vision: int, d_text: int, scale: int):
        super().__init__()
        self.scale = scale
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(d_vision * scale * scale, d_text, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(x, self.scale))


class Idefics3Vision(nn.Module):
    """tiles (N, 3, S, S) -> image features (N, tokens_per_image, text hidden)."""

    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__()
        self.vcfg = VisionConfig.from_dict({**VISION_DEFAULTS, **(raw.get("vision_config") or {})})
        scale = int(raw.get("scale_factor", 2))
        self.tokens_per_image = self.vcfg.n_patches // (scale * scale)  # per tile
        self.vision_model = SiglipVisionTower(self.vcfg)
        self.vision_model.embeddings = Idefics3Embeddings(self.vcfg)
        self.connector = Idefics3Connector(self.vcfg.hidden_size, text_hidden, scale)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        sd = {f"vision_model.{k}": v for k, v in vision_weights(weights, TOWER_PREFIXES).items()}
        sd |= {f"connector.{k}": v for k, v in vision_weights(weights, CONNECTOR_PREFIXES).items()}
        self.load_state_dict(sd, strict=True)

    def image_text(self, pixels: Any) -> str:
        """The prompt text an image's placeholder becomes (its tiles' markers and rows)."""
        return image_text(pixels, self.tokens_per_image)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.connector(self.vision_model(tiles))

    def encode_images(self, pixels: list) -> torch.Tensor:
        """IdeficsPixels of each image -> their rows in prompt order (tiles, then the global image)."""
        tiles = torch.from_numpy(np.concatenate([p.patches for p in pixels]))
        return self(tiles.to(next(self.parameters()).dtype))
