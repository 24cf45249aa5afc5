"""mistralrs-cli: a Python reimplementation of mistral.rs, the fast LLM inference engine."""
from __future__ import annotations

import os as _os

# libgomp reads its spin count once, when the first library that links it loads: torch (whose
# libgomp our native kernels then share) when it is imported before backends/native.py sets it,
# as on every torch-model path (plain, vision-plain, --isq). Set here, before anything imports
# torch: with libgomp's default spinning, decode steps of a 4-layer 7B-shaped Q4K model took
# 2-4x their CPU time on a busy 2-core machine (scripts/bench_vision.py's docstring).
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"

__all__ = ["Runner", "Which", "ChatCompletionRequest", "CompletionRequest", "Message", "Role", "VisionArchitecture"]


def __getattr__(name: str):
    # the API pulls in torch; load it on first use so `mistralrs --help` stays quick
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
