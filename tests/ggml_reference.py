"""llama.cpp's own quantizers and dequantizers (its libggml-base), built for the tests.

The source is a pinned package from PyPI: llama-cpp-python's sdist vendors llama.cpp, checked
against its sha256 here. libggml-base is the few C/C++ files of ggml/src/CMakeLists.txt's
`ggml-base` target, compiled with the system's cc and c++ into the cache
(~/.cache/mistralrs-cli/ggml/, or $MISTRALRS_CLI_CACHE/ggml/): a download of ~75 MB and about a
minute of compiling on two cores, once per machine. The tests build it when they first need it;
running this file builds it ahead (`make test` does, through `make ggml`).
MISTRALRS_CLI_GGML_LIB=path/to/libggml-base.so uses another build instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, as scripts/peers_setup.sh pins it for the benchmarks
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
GGML = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/ggml/"
# the ggml-base target's sources (ggml/src/CMakeLists.txt), nothing else
C_SOURCES = ["ggml.c", "ggml-alloc.c", "ggml-quants.c"]
CXX_SOURCES = ["ggml.cpp", "ggml-backend.cpp", "ggml-backend-meta.cpp", "ggml-opt.cpp", "ggml-threading.cpp",
               "gguf.cpp"]


class Unavailable(Exception):
    """Why the library cannot be had on this machine (a sentence for pytest.skip)."""


def cache_dir() -> Path:
    root = os.environ.get("MISTRALRS_CLI_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mistralrs-cli") / "ggml" / f"llama-cpp-python-{VERSION}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sdist(where: Path) -> Path:
    tar = where / SDIST
    if not tar.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", str(where)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if out.returncode != 0 or not tar.exists():
            raise Unavailable(f"pip could not download llama-cpp-python=={VERSION}'s source: "
                              + (out.stderr.strip().splitlines() or ["no output"])[-1])
    if _sha256(tar) != SHA256:
        tar.unlink()
        raise RuntimeError(f"{SDIST} does not have the pinned sha256 {SHA256}")
    return tar


def _extract(tar: Path, dest: Path) -> Path:
    """Only ggml's headers and the base sources (not the 75 MB of the rest)."""
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith(GGML) and (
            m.name.startswith(GGML + "include/") or m.name.count("/", len(GGML)) == 1
            or m.name.startswith(GGML + "src/ggml-cpu/") and m.name.endswith(".h"))]
        tf.extractall(dest, members=members, filter="data")
    src = dest / GGML / "src"
    # the header CMake's configure_file writes from ggml-version.h.in
    (src / "ggml-version.h").write_text(f'#pragma once\n#define GGML_VERSION "{VERSION}"\n'
                                        f'#define GGML_COMMIT "llama-cpp-python-{VERSION}"\n')
    return dest / GGML


def _compile(ggml: Path, out: Path, cc: str, cxx: str) -> None:
    inc = ["-I", str(ggml / "include"), "-I", str(ggml / "src")]
    jobs, objs = [], []
    for name in C_SOURCES + CXX_SOURCES:
        obj = out.parent / f"{name}.o"
        lang = [cc, "-std=gnu11", "-D_GNU_SOURCE"] if name.endswith(".c") else [cxx, "-std=c++17"]
        cmd = [*lang, "-O2", "-fPIC", "-DNDEBUG", *inc, "-c", str(ggml / "src" / name), "-o", str(obj)]
        jobs.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        objs.append(str(obj))
    for name, job in jobs:
        _, err = job.communicate(timeout=900)
        if job.returncode != 0:
            raise RuntimeError(f"compiling llama.cpp's {name} failed:\n{err[-2000:]}")
    link = subprocess.run([cxx, "-shared", "-o", str(out), *objs, "-lm", "-lpthread"], capture_output=True,
                          text=True, timeout=300)
    if link.returncode != 0:
        raise RuntimeError(f"linking libggml-base failed:\n{link.stderr[-2000:]}")


def build() -> Path:
    """The cached libggml-base.so, built first if it is not there."""
    lib = cache_dir() / "libggml-base.so"
    if lib.exists():
        return lib
    cc, cxx = shutil.which(os.environ.get("CC", "cc")), shutil.which(os.environ.get("CXX", "c++"))
    if cc is None or cxx is None:
        raise Unavailable("no C and C++ compiler (cc, c++) on this machine to build llama.cpp's libggml-base")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tar = _sdist(lib.parent)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        ggml = _extract(tar, Path(tmp))
        built = Path(tmp) / "libggml-base.so"
        _compile(ggml, built, cc, cxx)
        os.replace(built, lib)  # atomic: a concurrent run sees the whole file or none
    return lib


@functools.cache
def _load() -> ctypes.CDLL | Unavailable:
    """Once per session: a failed build is not tried again by every test."""
    path = os.environ.get("MISTRALRS_CLI_GGML_LIB")
    try:
        return ctypes.CDLL(path or str(build()))
    except OSError as e:
        return Unavailable(f"cannot load llama.cpp's libggml-base ({e})")
    except Unavailable as e:
        return e


def library() -> ctypes.CDLL:
    """llama.cpp's libggml-base, loaded; raises Unavailable with the reason it cannot be."""
    lib = _load()
    if isinstance(lib, Unavailable):
        raise lib
    return lib


def ggml_library() -> ctypes.CDLL:
    """For tests: the library, or a skip that says why (a failure under CI=true, where the
    checks must run)."""
    import pytest

    try:
        return library()
    except Unavailable as e:
        if os.environ.get("CI") and "compiler" not in str(e):
            pytest.fail(str(e))
        pytest.skip(str(e))


if __name__ == "__main__":
    try:
        print(build())
    except Unavailable as e:
        print(f"skipped: {e}", file=sys.stderr)
