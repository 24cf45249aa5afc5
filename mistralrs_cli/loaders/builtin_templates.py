"""Built-in chat templates for a GGUF file that carries none (Gemma-3's does not).

llama.cpp recognises a chat format from a template's text (llm_chat_detect_template) and, when a
model has no template at all, llama-server renders ChatML. We pick by the file's architecture
instead, since the family fixes the turn format, and where one architecture serves several
formats (llama: Llama 2, Llama 3, SmolLM's ChatML, Mistral) by the special tokens its vocabulary
has. Anything else gets llama-server's ChatML. The templates are package data
(mistralrs_cli/chat_templates/*.jinja), rendered by the same sandbox as any other.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .chat_template import ChatTemplate

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "chat_templates"

# GGUF general.architecture -> template name
ARCH_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "phi3": "phi3",
}
# architectures shared by several chat formats: the first of these tokens in the vocabulary decides
VOCAB_HINTS = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"),
               ("[INST]", "mistral"), ("<|assistant|>", "phi3"))
ARCH_FALLBACK = {"llama": "llama2"}  # a llama file with none of the hints: Llama 2 chat
FALLBACK = "chatml"  # what llama-server renders for a model without a template


def template_name(arch: str, has_token: Callable[[str], bool]) -> str:
    """The built-in template for a GGUF architecture; has_token(text) says whether the vocabulary
    has that token."""
    if arch in ARCH_TEMPLATES:
        return ARCH_TEMPLATES[arch]
    for token, name in VOCAB_HINTS:
        if has_token(token):
            return name
    return ARCH_FALLBACK.get(arch, FALLBACK)


class BuiltinTemplate(ChatTemplate):
    """A built-in template standing in for the file's: the first render says so in one line (a
    warning, so --quiet hides it; a --raw run never renders, so it never says it)."""

    def __init__(self, source: str, origin: str, notice: str):
        super().__init__(source, origin)
        self.notice: str | None = notice

    def render(self, *args, **kwargs) -> str:
        if self.notice:
            log.warning(self.notice)
            self.notice = None
        return super().render(*args, **kwargs)


def builtin_template(arch: str, has_token: Callable[[str], bool], file_name: str) -> ChatTemplate:
    """The template template_name picks for a file that has none."""
    name = template_name(arch, has_token)
    notice = (f"{file_name} has no chat template; using the built-in {name} template for its {arch} "
              f"architecture (mistralrs_cli/chat_templates/{name}.jinja; -c/--chat-template FILE to "
              f"choose another)")
    source = (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    return BuiltinTemplate(source, f"the built-in {name} template", notice)
