"""The CUDA kernels ship in the package (mistralrs_cli/cuda/, package data in pyproject.toml):
importlib.resources finds every file the launch table and the sources' #includes name, and a
wheel built from the tree carries them (and the native CPU kernels' C sources)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from mistralrs_cli.backends import cupy_backend as cb

ROOT = Path(__file__).resolve().parents[1]


def _named_files() -> set[str]:
    """<op>.cu for every op of the launch table, and every file those sources #include."""
    names = {f"{op}.cu" for op in cb.LAUNCH}
    for name in sorted(names):
        src = resources.files("mistralrs_cli").joinpath("cuda", name).read_text()
        names |= set(re.findall(r'#include\s+"([^"]+)"', src))
    return names


def test_resources_find_every_kernel_file():
    cuda = resources.files("mistralrs_cli").joinpath("cuda")
    named = _named_files()
    assert {"dequantize.cu", "gemv.cu", "gemm.cu", "quants.cuh"} <= named
    for name in named:
        assert cuda.joinpath(name).is_file(), name
    # what the backend compiles is exactly the packaged files
    assert Path(str(cuda)).resolve() == cb.CUDA_DIR
    on_disk = {p.name for p in cb.CUDA_DIR.glob("*.cu")}
    assert on_disk == {n for n in named if n.endswith(".cu")}
    assert all(cuda.joinpath(n).read_text() in cb.kernel_source() for n in on_disk)


def test_wheel_carries_the_kernels(tmp_path):
    """A wheel built (no isolation, no network) from a copy of the package has every kernel source."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mistralrs_cli", src / "mistralrs_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"mistralrs_cli/cuda/{n}" for n in _named_files()}
    want |= {f"mistralrs_cli/backends/csrc/{p.name}" for p in (ROOT / "mistralrs_cli/backends/csrc").glob("*.[ch]")}
    assert want <= names, sorted(want - names)
