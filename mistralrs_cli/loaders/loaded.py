"""Loaded: the bundle every loader returns and the engine consumes (load.py dispatches to the
format loaders; they build this, so it lives below all of them)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..models.config import ModelConfig
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # jinja2 is imported when a template is built (load.py), not with this module
    from .chat_template import ChatTemplate


@dataclass
class Loaded:
    model: Any  # a torch CausalLM, or the native runtime's NativeModel
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    config: ModelConfig
    model_id: str  # the name /v1/models and the stats show
    eos_ids: set[int] = field(default_factory=set)
    bos_token: str = ""
    eos_token: str = ""
    # the sampling fields generation_config.json sets (sampling_defaults.from_generation_config)
    generation_config: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters served unmerged (adapters/bank.py AdapterBank), the names active by default,
    # and an X-LoRA model's classifier (adapters/xlora.py), or None
    adapters: Any = None
    default_adapters: list[str] = field(default_factory=list)
    xlora: Any = None
    # speculative decoding (engine/speculative.py SpecConfig: a draft model or n-gram lookup), or None
    speculative: Any = None
    # a vision model's image encoder and processor (vision/prompt.py Vision), or None
    vision: Any = None

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings


def read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as JSON ({e}); fix or remove the file.") from None
