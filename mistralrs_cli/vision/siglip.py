"""The SigLIP vision tower (transformers' SiglipVisionTransformer without its pooling head, HF
module names), used by multimodal Gemma 3. The encoder layers are CLIP's (vision/clip.py)."""
from __future__ import annotations

import torch
from torch import nn

from .clip import Encoder, VisionConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.n_patches, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        return patches + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """pixels (N, C, H, W) -> the last hidden states after post_layernorm (N, patches, hidden)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixels)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)
