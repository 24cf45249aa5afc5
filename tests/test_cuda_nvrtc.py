"""Every cuda/*.cu compiles exactly as CuPy's RawModule would compile it (CuPy's own NVRTC entry
point and option list) for the GPUs people run this on; and the device choice with no GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.errors import UserError

ARCHS = ("80", "86", "89", "90")
SOURCES = sorted(cb.CUDA_DIR.glob("*.cu"))


@pytest.fixture(scope="module")
def nvrtc(request):
    """CuPy's compile_using_nvrtc with the device-arch lookups answered without a device."""
    try:
        from cupy.cuda import compiler, nvrtc as nv
        from cupy._core import core

        nv.getVersion()
    except Exception as e:  # no cupy wheel, or no NVRTC library beside it
        pytest.skip(f"CuPy/NVRTC unavailable: {e}")
    mp = pytest.MonkeyPatch()
    # CuPy asks the current device for its arch even when one is passed; there is no device here.
    target = {"cubin": "sm", "ptx": "compute"}
    mp.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch={target[method]}_{arch}", method))
    mp.setattr(compiler, "_get_arch", lambda: ARCHS[0])
    request.addfinalizer(mp.undo)
    # RawModule -> core.compile_with_cache -> assemble_cupy_compiler_options (CCCL/libcu++ include
    # dirs, --std=c++17) -> _compile_with_cache_cuda (+ -ftz=true) -> compile_using_nvrtc
    options = core.assemble_cupy_compiler_options(cb.kernel_options()) + ("-ftz=true",)
    method = "cubin"  # what CuPy does by default; "ptx" is its CUPY_COMPILE_WITH_PTX=1 path

    def compile_(src: str, arch: str, how: str = "cubin"):
        nonlocal method
        method = how
        return compiler.compile_using_nvrtc(src, options, arch=arch)
    return compile_


def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"dequantize.cu", "gemv.cu", "gemm.cu"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_compiles_with_cupy_nvrtc(nvrtc, path: Path, arch: str):
    cubin = nvrtc(path.read_text(), arch)
    assert isinstance(cubin, tuple) and len(cubin[0]) > 1000  # (binary, mangled names)


def test_one_module_of_all_sources_compiles(nvrtc):
    """CupyLauncher loads all files as one RawModule: their definitions must not collide.
    (PTX only: the per-file tests above already ran the SASS back end on the same code.)"""
    assert b".entry gemm_q4_k_f32" in nvrtc(cb.kernel_source(), ARCHS[-1], "ptx")[0]


def test_nvrtc_rejects_host_headers(nvrtc):
    """The check is real: a host header that nvcc would accept fails here."""
    with pytest.raises(Exception, match="cstdio|cannot open"):
        nvrtc('#include <cstdio>\nextern "C" __global__ void k() {}\n', ARCHS[0])


class _NoGPU:
    @staticmethod
    def is_available():
        return False


def test_device_choice_without_gpu(monkeypatch):
    monkeypatch.setattr(cb, "_cupy", lambda: _NoGPU)
    ok, reason = cb.cuda_status()
    assert not ok and "no usable CUDA GPU" in reason
    assert cb.resolve_device("cpu") == ("cpu", None)
    device, notice = cb.resolve_device("auto")
    assert device == "cpu" and notice.startswith("no usable GPU") and "\n" not in notice
    with pytest.raises(UserError, match="--device cuda: CuPy finds no usable CUDA GPU.*--device cpu"):
        cb.resolve_device("cuda")


def test_status_follows_cupy_here():
    cupy = pytest.importorskip("cupy")
    assert cb.cuda_status()[0] == bool(cupy.is_available())


def test_bench_script_without_gpu():
    cupy = pytest.importorskip("cupy")
    if cupy.is_available():
        pytest.skip("a GPU is here: the benchmark would run for real")
    script = cb.CUDA_DIR.parent / "scripts" / "bench_kernels.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no GPU" in proc.stdout, proc.stderr[-2000:]
