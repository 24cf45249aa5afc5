"""LLaVA 1.5 (transformers' LlavaForConditionalGeneration): a CLIP vision tower and a two-layer
projector turn an image into rows of the text model's input embeddings. The text model is the
registered text architecture (llama for LLaVA 1.5), loaded and run as `plain` runs it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vision.clip import ACTIVATIONS, CLIPVisionTower, VisionConfig, vision_weights

# where each checkpoint spelling keeps the tower and the projector (hub, transformers 5 in memory)
TOWER_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
                  "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


class LlavaProjector(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """pixels (N, 3, H, W) -> image features (N, tokens_per_image, text hidden)."""

    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__()
        self.vcfg = VisionConfig.from_dict(raw.get("vision_config") or {})
        layer = raw.get("vision_feature_layer", -2)
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.strategy = raw.get("vision_feature_select_strategy", "default")
        self.vision_tower = CLIPVisionTower(self.vcfg)
        self.multi_modal_projector = LlavaProjector(
            self.vcfg.hidden_size * len(self.feature_layers), text_hidden,
            raw.get("projector_hidden_act", "gelu"), raw.get("multimodal_projector_bias", True))

    @property
    def tokens_per_image(self) -> int:
        return self.vcfg.n_patches + (0 if self.strategy == "default" else 1)

    def state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors under this module's names."""
        sd = {f"vision_tower.{k}": v for k, v in vision_weights(weights, TOWER_PREFIXES).items()}
        return sd | {f"multi_modal_projector.{k}": v for k, v in vision_weights(weights, PROJECTOR_PREFIXES).items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(self.state(weights), strict=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = self.vcfg.num_hidden_layers
        idx = [i % (n + 1) for i in self.feature_layers]  # hidden_states has n + 1 entries
        states = self.vision_tower.hidden_states(pixels, max(idx))
        picked = [states[i] for i in idx]
        if self.strategy == "default":  # the CLS row is dropped
            picked = [s[:, 1:] for s in picked]
        return self.multi_modal_projector(torch.cat(picked, dim=-1))
