"""Every cuda/*.cu compiles exactly as CuPy's RawModule would compile it (CuPy's own NVRTC entry
point and option list) for the GPUs people run this on; and the device choice with no GPU.
(All files as the one module CupyLauncher loads: the emulator compiles that concatenation, see
test_cuda_kernels.test_kernel_table_covers_every_kernel_in_the_module.)"""
from __future__ import annotations

import runpy
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
    mp.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    mp.setattr(compiler, "_get_arch", lambda: ARCHS[0])
    request.addfinalizer(mp.undo)
    # RawModule -> core.compile_with_cache -> assemble_cupy_compiler_options (CCCL/libcu++ include
    # dirs, --std=c++17) -> _compile_with_cache_cuda (+ -ftz=true) -> compile_using_nvrtc
    options = core.assemble_cupy_compiler_options(cb.kernel_options()) + ("-ftz=true",)
    return lambda src, arch: compiler.compile_using_nvrtc(src, options, arch=arch)


def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"dequantize.cu", "gemv.cu", "gemm.cu"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_compiles_with_cupy_nvrtc(nvrtc, path: Path, arch: str):
    cubin = nvrtc(path.read_text(), arch)
    assert isinstance(cubin, tuple) and len(cubin[0]) > 1000  # (binary, mangled names)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_module_cupy_loads_compiles(nvrtc, arch: str):
    """CupyLauncher hands RawModule every file as one source (kernel_source): that compiles too,
    and its binary has every kernel the launch table names."""
    import torch

    binary = nvrtc(cb.kernel_source(), arch)[0]
    names = {cb.kernel_name(op, q, dt) for q in cb.KERNEL_TAGS for op, dts in
             (("dequantize", cb.DTYPE_TAGS), ("gemv", [torch.float32]), ("gemm", [torch.float32])) for dt in dts}
    missing = [n for n in sorted(names) if n.encode() + b"\0" not in binary]
    assert not missing, missing


def test_nvrtc_rejects_host_headers(nvrtc):
    """The check is real: a host header that nvcc would accept fails here."""
    with pytest.raises(Exception, match="cstdio|cannot open"):
        nvrtc('#include <cstdio>\nextern "C" __global__ void k() {}\n', ARCHS[0])


class _NoGPU:
    @staticmethod
    def is_available():
        return False


def test_device_choice_without_gpu(monkeypatch):
    import torch

    ok, reason = cb.cuda_status()  # this machine: torch answers, CuPy is never imported
    assert not ok and "torch sees no CUDA GPU" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a driver, but CuPy disagrees
    monkeypatch.setattr(cb, "_cupy", lambda: _NoGPU)
    ok, reason = cb.cuda_status()
    assert not ok and "no usable CUDA GPU" in reason
    assert cb.resolve_device("cpu") == ("cpu", None)
    device, notice = cb.resolve_device("auto")
    assert device == "cpu" and notice.startswith("no usable GPU") and "\n" not in notice
    with pytest.raises(UserError, match="--device cuda: CuPy finds no usable CUDA GPU.*--device cpu"):
        cb.resolve_device("cuda")


def test_cupy_launcher_hands_cupy_the_module_views_and_torchs_stream(monkeypatch):
    """CupyLauncher against a stand-in cupy (no GPU here): RawModule gets the packaged source and
    options, arrays are DLPack views of the torch tensors' own memory (bf16 as int16: CuPy has no
    bfloat16), and launches go on torch's current stream."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch

    seen = {}

    class RawModule:
        def __init__(self, code, options):
            seen["code"], seen["options"] = code, options

        def get_function(self, name):
            return name

    def external_stream(ptr):
        seen["stream"] = ptr
        return nullcontext()

    fake = SimpleNamespace(RawModule=RawModule, from_dlpack=lambda t: t,
                           cuda=SimpleNamespace(ExternalStream=external_stream))
    monkeypatch.setattr(cb, "_cupy", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=0xC0FFEE))
    launcher = cb.CupyLauncher()
    assert seen["code"] == cb.kernel_source() and seen["options"] == (f"-I{cb.CUDA_DIR}",)
    assert launcher.get_function("gemv_q4_0_f32") == "gemv_q4_0_f32"
    for dtype, want in ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.int16)):
        t = torch.ones(3, 4, dtype=dtype)
        a = launcher.array(t)
        assert a.dtype == want and a.data_ptr() == t.data_ptr() and a.shape == t.shape
    with launcher.stream():
        pass
    assert seen["stream"] == 0xC0FFEE


def test_status_follows_cupy_here():
    cupy = pytest.importorskip("cupy")
    assert cb.cuda_status()[0] == bool(cupy.is_available())


def test_bench_rows_run_on_the_emulator():
    """The benchmark's per-type code (weights, GEMV, GEMM, torch's dequantize+matmul) runs for
    every type of the table, on the CPU with the emulator as the launcher and a stand-in timer."""
    from argparse import Namespace

    from cuda_emu.fixtures import emu_launcher

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"),
                            run_name="bench_kernels")
    backend, calls = cb.CupyBackend(emu_launcher(("forward",))), []

    def timer(fn, iters):
        fn()
        calls.append(iters)
        return 1e-3

    args = Namespace(n=5, k=256, m=9, iters=3)
    for qtype in cb.KERNEL_TAGS:
        row = script["bench"](backend, qtype, args, 100.0, device="cpu", timer=timer)
        assert row.lstrip().startswith(qtype.name) and "GB/s" in row and row.count("TFLOP/s") == 2
    assert calls == [3] * 3 * len(cb.KERNEL_TAGS)


def test_bench_script_without_gpu(monkeypatch, capsys):
    cupy = pytest.importorskip("cupy")
    if cupy.is_available():
        pytest.skip("a GPU is here: the benchmark would run for real")
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"), run_name="__main__")
    assert done.value.code == 0 and "no GPU" in capsys.readouterr().out
