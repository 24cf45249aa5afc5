"""Phi-3-vision (microsoft/Phi-3-vision-128k-instruct, config.json model_type "phi3_v",
Phi3VForCausalLM; transformers has no class for it). Its text model is Phi-3 (models/phi3.py, run
as `plain` runs it); `model.vision_embed_tokens` holds a CLIP tower (ViT-L/14-336 in the
checkpoint), the learnable separators glb_GN and sub_GN, and img_projection (Linear, GELU, Linear).

An image's crops (the global view and the HD crops, vision/phi3v_processor.py) go through the tower;
from the penultimate layer's patch features (CLS dropped) each 2 x 2 block of patches is merged into
one row of 4 x width channels. The crops' merged grids are laid out as the image's crop grid, a
sub_GN row ends each grid row; then glb_GN; then the global view's grid, its rows ended by sub_GN
too; the projection maps all of it into the text model's input rows."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..loaders.chat_template import ChatTemplate
from ..vision.clip import CLIPVisionTower, VisionConfig, vision_weights
from ..vision.phi3v_processor import Phi3VPixels, image_tokens, tag_image_parts, tags_to_token

PREFIX = "model.vision_embed_tokens."
TOWER = "img_processor.vision_model."


def tower_config(weights: dict[str, torch.Tensor]) -> VisionConfig:
    """The CLIP tower's shape, read from its tensors (Phi-3-V's config.json does not give it);
    heads: one per 64 channels, as in OpenAI's CLIP towers (ViT-L/14: 1024 wide, 16 heads)."""
    t = {k[len(TOWER):]: v for k, v in weights.items() if k.startswith(TOWER)}
    try:
        width = t["embeddings.class_embedding"].shape[0]
        patch = t["embeddings.patch_embedding.weight"].shape[-1]
        positions = t["embeddings.position_embedding.weight"].shape[0]
        inner = t["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise RuntimeError(f"missing tensors\n{PREFIX}{TOWER}{e.args[0]} is missing") from None
    layers = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    side = round((positions - 1) ** 0.5)
    return VisionConfig(hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
                        num_attention_heads=max(1, width // 64), image_size=side * patch, patch_size=patch,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)


class Phi3VVision(nn.Module):
    """Phi3VPixels -> the image's rows of text-model input (image_tokens of them)."""

    weight_prefix = PREFIX  # the loader reads only these tensors

    def __init__(self, raw: dict[str, Any], text_hidden: int):
        super().__init__()
        proc = raw.get("img_processor") or {}
        embd = raw.get("embd_layer") or {}
        self.layer = proc.get("layer_idx", -2)
        self.with_cls = proc.get("type_feature", "patch") == "cls_patch"
        order = embd.get("hd_transform_order", "sub_glb")
        if order != "sub_glb" or embd.get("use_hd_transform", True) is not True or self.with_cls:
            raise UserError(f"config.json: embd_layer {embd} / img_processor type_feature "
                            f"{proc.get('type_feature')!r} is not Phi-3-V's HD transform (sub_glb, patch).")
        self.text_hidden = text_hidden
        self.vcfg: VisionConfig | None = None

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        w = {k: v for k, v in vision_weights(weights, (PREFIX,)).items()
             if not k.startswith("wte.") and not k.endswith("position_ids")}  # the shared text embedding
        self.vcfg = cfg = tower_config(w)
        if cfg.image_size // cfg.patch_size % 2:
            raise RuntimeError(f"bad tower\n{cfg.image_size // cfg.patch_size} patches a side cannot merge 2 x 2")
        d = 4 * cfg.hidden_size
        self.img_processor = nn.Module()
        self.img_processor.vision_model = CLIPVisionTower(cfg)
        self.glb_GN = nn.Parameter(torch.empty(1, 1, d))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, d))
        self.img_projection = nn.Sequential(nn.Linear(d, self.text_hidden), nn.GELU(),
                                            nn.Linear(self.text_hidden, self.text_hidden))
        self.load_state_dict(w, strict=True)

    @property
    def side(self) -> int:
        """Merged rows (and columns) of one crop: 12 for 336 px crops of 14 px patches."""
        return self.vcfg.image_size // self.vcfg.patch_size // 2

    @property
    def tokens_per_image(self) -> int:  # a one-crop image; tokens_for gives each image's own
        return image_tokens((1, 1), self.side)

    def tokens_for(self, px: Phi3VPixels) -> int:
        return image_tokens(px.grid, self.side)

    def merged(self, pixels: torch.Tensor) -> torch.Tensor:
        """(crops, 3, S, S) -> (crops, side, side, 4 x width): the chosen layer's patch features,
        each 2 x 2 block of patches side by side in the channels (row by row within the block)."""
        n = self.vcfg.num_hidden_layers
        idx = self.layer % (n + 1)  # hidden_states has n + 1 entries
        feats = self.img_processor.vision_model.hidden_states(pixels, idx)[idx][:, 1:]
        k, s = feats.shape[0], self.side
        return feats.view(k, s, 2, s, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(k, s, s, -1)

    def _with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols, C) -> (rows * (cols + 1), C): sub_GN after each row."""
        ends = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, ends], dim=1).reshape(-1, grid.shape[-1])

    def encode_images(self, pixels: list[Phi3VPixels]) -> torch.Tensor:
        """-> (sum of tokens_for, text hidden), image by image."""
        out = []
        for px in pixels:
            m = self.merged(torch.from_numpy(px.crops).to(self.glb_GN.dtype))
            rows, cols = px.grid
            s = self.side
            grid = m[1:].view(rows, cols, s, s, -1).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, -1)
            rows_in = torch.cat([self._with_row_ends(grid), self.glb_GN.reshape(1, -1), self._with_row_ends(m[0])])
            out.append(self.img_projection(rows_in))
        return torch.cat(out)

    def setup(self, loaded: Any, processor_path: str) -> None:
        """What Phi-3-V's processor does around the pixels: <|image_N|> tags in the text, image
        parts written as tags for its string-only chat template, a BOS when the tokenizer adds one."""
        proc = loaded.vision.processor
        if proc.crop != self.vcfg.image_size:
            raise UserError(f"{processor_path}: crop_size {proc.crop} does not fit the vision tower's "
                            f"{self.vcfg.image_size} px input; set crop_size to {self.vcfg.image_size}.")
        loaded.vision.tag_rewrite = tags_to_token
        loaded.vision.image_token = "<|image_1|>"
        if loaded.chat_template is not None:
            loaded.chat_template = TaggedTemplate.wrap(loaded.chat_template, bool(loaded.tokenizer.add_bos))


class TaggedTemplate(ChatTemplate):
    """Phi-3-V's chat template renders string content only: image parts become <|image_N|> tags
    first; its processor tokenizes with the BOS the tokenizer adds, so the text starts with it."""

    add_bos = False

    @classmethod
    def wrap(cls, template: ChatTemplate, add_bos: bool) -> "TaggedTemplate":
        out = cls.__new__(cls)
        out.__dict__.update(template.__dict__)
        out.add_bos = add_bos
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "",
               eos_token: str = "", *, flatten_content: bool = True, **extra: Any) -> str:
        text = super().render(tag_image_parts(messages), add_generation_prompt, bos_token, eos_token,
                              flatten_content=True, **extra)
        return bos_token + text if self.add_bos and bos_token and not text.startswith(bos_token) else text
