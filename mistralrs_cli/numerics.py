"""The --numerics modes and their check, shared by the CLI, the benchmark tool and the Python API."""
from __future__ import annotations

from .errors import UserError

NUMERICS = ("fast", "precise", "exact")
# teacher-forced top-1 agreement of "fast" with llama.cpp's own logits (tests/test_llamacpp_teacher.py)
FAST_VS_LLAMACPP = "95.5% / 92.0% of 512 teacher-forced positions on SmolLM2 / Gemma-3"


def check_numerics(numerics: str, name: str = "--numerics") -> None:
    if numerics == "llama.cpp":
        raise UserError(f"{name} 'llama.cpp' is gone: the 8-bit path is now called 'fast', and it does not "
                        f"reproduce llama.cpp's logits (its top-1 token is llama.cpp's at {FAST_VS_LLAMACPP}); use "
                        "fast, precise or exact.")
    if numerics not in NUMERICS:
        raise UserError(f"{name} {numerics!r} is not one of {', '.join(NUMERICS)}.")
