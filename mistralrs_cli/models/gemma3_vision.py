"""Multimodal Gemma 3 (transformers' Gemma3ForConditionalGeneration): a SigLIP tower, its
patches average-pooled to mm_tokens_per_image, a Gemma RMSNorm and one projection matrix turn an
image into rows of the registered gemma3_text model's input. The image's rows attend to each
other both ways in the prefill (Vision.bidirectional: the engine passes their spans)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..vision.clip import VisionConfig, vision_weights
from ..vision.siglip import SiglipVisionTower

TOWER_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
                  "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


class Gemma3Projector(nn.Module):
    def __init__(self, vcfg: VisionConfig, text_hidden: int, tokens: int):
        super().__init__()
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vcfg.hidden_size, text_hidden))
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.empty(vcfg.hidden_size))
        self.eps = vcfg.layer_norm_eps
        self.side = vcfg.image_size // vcfg.patch_size
        self.kernel = self.side // int(tokens ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape  # (B, patches, D)
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # (B, tokens, D)
        p = pooled.float()
        normed = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.mm_soft_emb_norm.weight.float())
        return torch.matmul(normed.type_as(x), self.mm_input_projection_weight).type_as(x)


class Gemma3Vision(nn.Module):
    """pixels (N, 3, H, W) -> image features (N, mm_tokens_per_image, text hidden)."""

    bidirectional = True  # transformers' Gemma 3 lets an image's rows see each other in the prefill

    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__()
        self.vcfg = VisionConfig.from_dict({"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                                            **(raw.get("vision_config") or {})})
        self.tokens_per_image = int(raw.get("mm_tokens_per_image", 256))
        self.vision_tower = SiglipVisionTower(self.vcfg)
        self.multi_modal_projector = Gemma3Projector(self.vcfg, text_hidden, self.tokens_per_image)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        tower = {k: v for k, v in vision_weights(weights, TOWER_PREFIXES).items() if not k.startswith("head.")}
        sd = {f"vision_tower.{k}": v for k, v in tower.items()}
        sd |= {f"multi_modal_projector.{k}": v for k, v in vision_weights(weights, PROJECTOR_PREFIXES).items()}
        self.load_state_dict(sd, strict=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixels))
