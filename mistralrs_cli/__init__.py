"""mistralrs-cli: a Python reimplementation of mistral.rs, the fast LLM inference engine."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Runner", "Which", "ChatCompletionRequest", "CompletionRequest", "Message", "Role", "VisionArchitecture"]


def __getattr__(name: str):
    # the API pulls in torch; load it on first use so `mistralrs --help` stays quick
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
