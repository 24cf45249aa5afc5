"""Kernel backends behind one small protocol (base.Backend). Nothing is imported here: the
native CPU runtime (native.py, native_model.py) must not pull in torch."""
from __future__ import annotations

_DEFAULT = None


def default_backend():
    global _DEFAULT
    if _DEFAULT is None:
        from .torch_backend import TorchBackend

        _DEFAULT = TorchBackend()
    return _DEFAULT


def __getattr__(name: str):
    if name == "TorchBackend":
        from .torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(name)
