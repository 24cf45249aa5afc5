"""Idefics2 (transformers' Idefics2ForConditionalGeneration): a SigLIP tower over frames of their
own sizes (a prompt's frames padded together, padded patches masked, each frame's patch grid
bucketed onto the position table as transformers does), an MLP into the text width and a
perceiver resampler that turns each frame into resampler_n_latents rows of the registered text
model's (mistral's) input."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..vision.clip import ACTIVATIONS, VisionConfig, vision_weights
from ..vision.idefics_processor import idefics2_text
from ..vision.siglip import SiglipVisionTower

TOWER_PREFIXES = ("model.vision_model.", "vision_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
PERCEIVER_DEFAULTS = {"hidden_act": "silu", "hidden_size": 4096, "rms_norm_eps": 1e-6, "resampler_n_latents": 64,
                      "resampler_depth": 3, "resampler_n_heads": 16, "resampler_head_dim": 96,
                      "num_key_value_heads": 4}


def grid_positions(mask: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W) patch mask -> (B, H * W) position ids, transformers' float32 bucketize of each
    frame's own grid onto side x side; padded patches get 0."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    ids = []
    for m in mask:
        steps = 1.0 / m[:, 0].sum(), 1.0 / m[0, :].sum()
        h, w = (torch.bucketize((torch.arange(n, dtype=torch.float32) * st).clamp(max=1.0 - 1e-6), boundaries,
                                right=True) for n, st in zip(m.shape, steps))
        ids.append(torch.where(m.reshape(-1), (h[:, None] * side + w[None, :]).reshape(-1), 0))
    return torch.stack(ids)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, d_in: int, d_mid: int, d_out: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d_in, d_mid, bias=False), nn.Linear(d_in, d_mid, bias=False)
        self.down_proj, self.act = nn.Linear(d_mid, d_out, bias=False), ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d, self.heads, self.kv, self.hd = (c["hidden_size"], c["resampler_n_heads"], c["num_key_value_heads"],
                                           c["resampler_head_dim"])
        self.q_proj = nn.Linear(d, self.heads * self.hd, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(d, self.kv * self.hd, bias=False) for _ in range(2))
        self.o_proj = nn.Linear(self.heads * self.hd, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        both = torch.cat([context, latents], dim=1)  # the latents see the context and each other
        q = self.q_proj(latents).view(b, n, self.heads, self.hd).transpose(1, 2)
        k, v = (p(both).view(b, both.shape[1], self.kv, self.hd).transpose(1, 2).repeat_interleave(
            self.heads // self.kv, dim=1) for p in (self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.input_latents_norm, self.input_context_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.self_attn = PerceiverAttention(c)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = GatedMLP(d, 4 * d, d, c["hidden_act"])

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(c["resampler_n_latents"], c["hidden_size"]))
        self.layers = nn.ModuleList(PerceiverLayer(c) for _ in range(c["resampler_depth"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], -1, -1)
        mask = torch.cat([mask, torch.ones(mask.shape[0], latents.shape[1], dtype=torch.bool)], dim=1)
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    def __init__(self, d_vision: int, text: dict[str, Any], perceiver: dict[str, Any]):
        super().__init__()
        self.modality_projection = GatedMLP(d_vision, int(text.get("intermediate_size", 14336)),
                                            int(text["hidden_size"]), text.get("hidden_act", "silu"))
        self.perceiver_resampler = PerceiverResampler(perceiver)


def _perceiver_config(raw: dict[str, Any]) -> dict[str, Any]:
    text = raw.get("text_config") or {}
    c = {**PERCEIVER_DEFAULTS, **{k: v for k, v in (raw.get("perceiver_config") or {}).items() if v is not None}}
    if c["hidden_size"] != text.get("hidden_size"):  # as Idefics2Config: the perceiver takes the text width
        c["hidden_size"], c["rms_norm_eps"] = text.get("hidden_size"), text.get("rms_norm_eps", 1e-6)
    return c


class Idefics2Vision(nn.Module):
    """Idefics2Pixels of a prompt's images -> their rows (resampler_n_latents per frame), in order."""

    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__()
        self.vcfg = VisionConfig.from_dict({**VISION_DEFAULTS, **(raw.get("vision_config") or {})})
        perceiver = _perceiver_config(raw)
        self.tokens_per_image = int(perceiver["resampler_n_latents"])  # per frame
        self.frames_per_image = 1  # set by the loader from the image processor (5 when it splits)
        self.vision_model = SiglipVisionTower(self.vcfg)
        self.connector = Idefics2Connector(self.vcfg.hidden_size, {**(raw.get("text_config") or {}),
                                                                   "hidden_size": text_hidden}, perceiver)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        sd = {f"vision_model.{k}": v for k, v in vision_weights(weights, TOWER_PREFIXES).items()}
        sd |= {f"connector.{k}": v for k, v in vision_weights(weights, CONNECTOR_PREFIXES).items()}
        self.load_state_dict(sd, strict=True)

    def prompt_text(self, text: str) -> str:
        return idefics2_text(text, self.tokens_per_image, self.frames_per_image)

    def _tower(self, pixels: torch.Tensor, pmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded frames (B, 3, H, W) + pixel mask (B, H, W) -> (hidden states, patch mask (B, T))."""
        p, vm = self.vcfg.patch_size, self.vision_model
        # a patch counts when all its pixels are the frame's (Idefics2's rule; Idefics3's is any pixel)
        mask = pmask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) == p * p  # (B, H/p, W/p)
        pos = grid_positions(mask, self.vcfg.image_size // p)
        h = vm.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2) + vm.embeddings.position_embedding(pos)
        keys = mask.reshape(mask.shape[0], -1)
        for layer in vm.encoder.layers:
            h = h + self._attend(layer.self_attn, layer.layer_norm1(h), keys)
            h = h + layer.mlp(layer.layer_norm2(h))
        return vm.post_layernorm(h), keys

    @staticmethod
    def _attend(attn: nn.Module, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (pr(x).view(b, t, attn.heads, -1).transpose(1, 2) for pr in (attn.q_proj, attn.k_proj, attn.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])  # padded patches unseen
        return attn.out_proj(o.transpose(1, 2).reshape(b, t, d))

    def encode_images(self, pixels: list) -> torch.Tensor:
        frames = [f for p in pixels for f in p.frames]  # padded together, as transformers pads a prompt's
        hh, ww = max(f.shape[1] for f in frames), max(f.shape[2] for f in frames)
        x = np.zeros((len(frames), 3, hh, ww), dtype=np.float32)
        pmask = torch.zeros(len(frames), hh, ww, dtype=torch.bool)
        for i, f in enumerate(frames):
            x[i, :, :f.shape[1], :f.shape[2]] = f
            pmask[i, :f.shape[1], :f.shape[2]] = True
        h, keys = self._tower(torch.from_numpy(x).to(next(self.parameters()).dtype), pmask)
        c = self.connector
        return c.perceiver_resampler(c.modality_projection(h), keys)
