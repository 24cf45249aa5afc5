"""Text in -> prompt ids: chat messages through the template, or a raw completion prompt."""
from __future__ import annotations

from typing import Any

from .errors import UserError
from .loaders.load import Loaded


def chat_prompt(loaded: Loaded, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The template's text for messages; `tools` (OpenAI's tool objects) reach it as its
    `tools` variable, the way transformers' apply_chat_template passes them."""
    if loaded.chat_template is None:
        raise UserError(f"model {loaded.model_id} has no chat template; pass one with "
                        "-c/--chat-template FILE, or send a plain prompt (--raw).")
    if not messages:
        raise UserError("messages is empty; send at least one message.")
    return loaded.chat_template.render(messages, add_generation_prompt=True,
                                       bos_token=loaded.bos_token, eos_token=loaded.eos_token, tools=tools)


def chat_ids(loaded: Loaded, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The rendered template supplies BOS itself, so no special tokens are added."""
    return loaded.tokenizer.encode(chat_prompt(loaded, messages, tools), add_special_tokens=False)


def completion_ids(loaded: Loaded, prompt: str) -> list[int]:
    """A raw prompt gets BOS as the tokenizer's metadata says."""
    return loaded.tokenizer.encode(prompt, add_special_tokens=True)
