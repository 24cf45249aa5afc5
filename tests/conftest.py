"""Shared test set-up: offline hub, the two real models from the cache, one torch thread count."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = Path(os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli") / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = MODELS / "gemma-3-270m-q4_k_m.gguf"


def _model(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} is not in {MODELS}; run `make models` (scripts/fetch_models.py)")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model(SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _model(GEMMA3)


@pytest.fixture(scope="session")
def kernel_builds(tmp_path_factory):
    """The native kernels in three builds: as used (-march=native: AVX-512 where the CPU has it),
    256-bit (-mno-avx512f) and portable scalar (-mno-avx2 -mno-avx512f)."""
    from mistralrs_cli.backends import native

    fast = native.library()
    if fast is None:
        pytest.skip("no C compiler: the native kernels are optional")
    d = tmp_path_factory.mktemp("builds")
    return {"native": fast, "avx2": native.build(("-mno-avx512f",), d),
            "scalar": native.build(("-mno-avx2", "-mno-avx512f"), d)}
