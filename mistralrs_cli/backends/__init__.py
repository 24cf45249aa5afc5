"""Kernel backends behind one small protocol (base.Backend)."""
from __future__ import annotations

from .torch_backend import TorchBackend

_DEFAULT: TorchBackend | None = None


def default_backend() -> TorchBackend:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TorchBackend()
    return _DEFAULT
