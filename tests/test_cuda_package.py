"""The CUDA kernels' source lives at the top level (cuda/) and ships inside the package as
mistralrs_cli/cuda/ (pyproject.toml's package-dir): the backend finds every file the launch table
and the sources' #includes name, from a checkout and from an installed wheel, and a wheel built
from the tree carries them, the native CPU kernels' C sources and every module of the package."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mistralrs_cli.backends import cupy_backend as cb

ROOT = Path(__file__).resolve().parents[1]


def _named_files() -> set[str]:
    """<op>.cu for every op of the launch table, and every file those sources #include."""
    names = {f"{op}.cu" for op in cb.LAUNCH}
    for name in sorted(names):
        src = (ROOT / "cuda" / name).read_text()
        names |= set(re.findall(r'#include\s+"([^"]+)"', src))
    return names


def test_the_checkout_compiles_the_top_level_kernels():
    named = _named_files()
    assert {"dequantize.cu", "gemv.cu", "gemm.cu", "quants.cuh"} <= named
    assert cb.CUDA_DIR == ROOT / "cuda"  # what the backend compiles is the repository's cuda/
    assert all((cb.CUDA_DIR / name).is_file() for name in named)
    on_disk = {p.name for p in cb.CUDA_DIR.glob("*.cu")}
    assert on_disk == {n for n in named if n.endswith(".cu")}
    assert all((cb.CUDA_DIR / n).read_text() in cb.kernel_source() for n in on_disk)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (no isolation, no network) from a copy of the tree."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mistralrs_cli", "cuda"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


def test_wheel_carries_the_kernels_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"mistralrs_cli/cuda/{n}" for n in _named_files()}
    want |= {f"mistralrs_cli/backends/csrc/{p.name}" for p in (ROOT / "mistralrs_cli/backends/csrc").glob("*.[ch]")}
    # pyproject.toml lists the packages (package-dir needs that): a new one must be added there
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "mistralrs_cli").rglob("*.py")}
    assert want <= names, sorted(want - names)
    assert not any(n.startswith("cuda/") for n in names)  # inside the package, not beside it


def test_installed_wheel_finds_its_own_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("from mistralrs_cli.backends import cupy_backend as cb; "
            "print(cb.CUDA_DIR); print(len(cb.kernel_source()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    where, size = run.stdout.split()
    assert Path(where) == target / "mistralrs_cli" / "cuda"
    assert int(size) == len(cb.kernel_source())
