"""ModelConfig: the one typed configuration every architecture reads.

Built from config.json (plain) or GGUF metadata (gguf loader); unknown keys are dropped.
Field names are transformers' names so config.json maps by name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5  # phi: LayerNorm (with bias) in place of RMSNorm
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # per-layer attention kind, "full_attention" | "sliding_attention" (transformers' layer_types)
    layer_types: list[str] | None = None
    rope_local_base_freq: float | None = None  # gemma3: rope base of sliding layers
    query_pre_attn_scalar: float | None = None  # gemma*: attention scale = this ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    num_local_experts: int = 0  # mixtral: experts per MoE block (0: a dense MLP)
    num_experts_per_tok: int = 0  # mixtral: experts each token is routed to
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return self.sliding_window is not None

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer) else None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    """Every `pattern`-th layer is global, the rest slide (Gemma 3's 5:1 interleave)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
