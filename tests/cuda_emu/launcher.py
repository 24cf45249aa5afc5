"""The emulator behind CuPy's call shape: `EmuModule(code, options).get_function(name)(grid, block,
args, shared_mem=)`, with numpy arrays where CuPy takes device arrays and numpy scalars as CuPy
needs them. Each launch runs under several thread orders on private copies of the arrays (with
red zones), and the results must agree byte for byte before they are written back.
"""
from __future__ import annotations

import ctypes
from contextlib import nullcontext

import numpy as np

from .build import Param, build

SCHEDULES = ("forward", "reverse", "shuffled")
RED = 256  # red zone bytes on each side of every buffer
_SCALARS = {  # C type -> the numpy dtype a launch must pass
    "int": np.int32, "int32_t": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32,
    "uint32_t": np.uint32, "float": np.float32, "double": np.float64, "long long": np.int64,
    "int64_t": np.int64, "unsigned long long": np.uint64, "uint64_t": np.uint64, "size_t": np.uint64,
    "short": np.int16, "int16_t": np.int16, "uint16_t": np.uint16, "unsigned short": np.uint16,
}
_POINTEE = {"char": 1, "int8_t": 1, "uint8_t": 1, "unsigned char": 1, "__half": 2, "__nv_bfloat16": 2,
            **{k: np.dtype(v).itemsize for k, v in _SCALARS.items()}}


class EmuError(AssertionError):
    """A kernel did something the CUDA execution model does not allow, or a launch was malformed."""


class _RedZone(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("n", ctypes.c_size_t), ("label", ctypes.c_char_p)]


class _Buffer:
    """A private copy of one array argument, with red zones filled with 0xA5 either side."""

    def __init__(self, arr: np.ndarray, label: str, asan: bool = False):
        raw = arr.reshape(-1).view(np.uint8)
        self.n = raw.size
        # Under ASan the data ends where the allocation ends, so ASan's own red zone follows it
        # and catches reads past the end too (ours see writes only).
        self.store = np.empty(self.n + RED + (0 if asan else RED + 256), np.uint8)
        start = 0 if asan else (-self.store.ctypes.data) % 256
        self.store[start:start + RED] = 0xA5
        self.store[start + RED + self.n:] = 0xA5
        self.data = self.store[start + RED:start + RED + self.n]
        self.data[:] = raw
        self.ptr = ctypes.c_void_p(self.data.ctypes.data)
        base = self.store.ctypes.data + start
        self.label = label.encode()
        self.zones = [(base, RED)] + ([] if asan else [(base + RED + self.n, RED)])


def _check_args(kernel: str, params: list[Param], args: tuple) -> None:
    if len(args) != len(params):
        raise EmuError(f"kernel {kernel}: launched with {len(args)} arguments, its signature has "
                       f"{len(params)} ({', '.join(p.name for p in params)}) [every block, every thread]")
    every = " [every block, every thread: the launch itself is wrong]"
    for i, (p, a) in enumerate(zip(params, args)):
        what = f"kernel {kernel}: argument {i} ({p.ctype} {p.name})"
        if p.is_pointer:
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                raise EmuError(f"{what} needs a contiguous array, got {type(a).__name__}{every}")
            size = _POINTEE.get(p.base)
            if size is not None and a.itemsize != size:
                raise EmuError(f"{what} points to {size}-byte values, got an array of {a.dtype}{every}")
            continue
        want = _SCALARS.get(p.base)
        if want is None:
            raise EmuError(f"{what}: the emulator does not know this scalar type{every}")
        if not isinstance(a, np.generic) or a.dtype != np.dtype(want):
            got = a.dtype if isinstance(a, np.generic) else type(a).__name__
            raise EmuError(f"{what} needs {np.dtype(want).name} ({np.dtype(want).itemsize} bytes), got {got}{every}")


class EmuFunction:
    def __init__(self, module: "EmuModule", name: str, params: list[Param]):
        self.module, self.name, self.params = module, name, params
        self.thunk = ctypes.cast(module.lib[f"__emu_thunk_{name}"], ctypes.c_void_p)

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        grid, block = _dims(grid), _dims(block)
        _check_launch(self.name, grid, block, shared_mem)
        args = tuple(args)
        _check_args(self.name, self.params, args)
        runs = []
        for s in self.module.schedules:
            bufs, code, err = self._run(grid, block, args, shared_mem, SCHEDULES.index(s))
            if code:
                raise EmuError(f"{err} [{s} thread order]")
            runs.append(bufs)
            if len(runs) > 1:
                self._compare(runs[0], bufs, s, grid, block, args, shared_mem)
        for a, b in zip(args, runs[0]):
            if b is not None:
                a.reshape(-1).view(np.uint8)[:] = b.data

    def _run(self, grid, block, args, shared_mem, schedule, watch=None):
        asan = self.module.variant == "asan"
        bufs = [_Buffer(a, f"argument {i} ({p.name})", asan) if p.is_pointer else None
                for i, (p, a) in enumerate(zip(self.params, args))]
        store = [b.ptr if b is not None else ctypes.create_string_buffer(a.tobytes(), a.itemsize)
                 for b, a in zip(bufs, args)]
        argv = (ctypes.c_void_p * max(1, len(args)))(*[ctypes.addressof(s) for s in store])
        zones = [(p, n, b.label) for b in bufs if b is not None for p, n in b.zones]
        rz = (_RedZone * max(1, len(zones)))(*[_RedZone(p, n, lab) for p, n, lab in zones])
        writer = (ctypes.c_int * 6)(-1, -1, -1, -1, -1, -1)
        err = ctypes.create_string_buffer(1024)
        wp, wn = (None, 0) if watch is None else (bufs[watch[0]].data.ctypes.data + watch[1], watch[2])
        code = self.module.lib.emu_launch(
            self.name.encode(), self.thunk, argv, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
            ctypes.c_size_t(shared_mem), schedule, self.module.seed, rz, len(zones),
            ctypes.c_void_p(wp), ctypes.c_size_t(wn), writer, err, len(err))
        return (bufs if watch is None else list(writer)), code, err.value.decode()

    def _compare(self, first, bufs, order, grid, block, args, shared_mem) -> None:
        for i, (a, b) in enumerate(zip(first, bufs)):
            if a is None or np.array_equal(a.data, b.data):
                continue
            byte = int(np.flatnonzero(a.data != b.data)[0])
            size = args[i].itemsize
            elem = byte // size
            w, _, _ = self._run(grid, block, args, shared_mem, 0, watch=(i, elem * size, size))
            who = f"block ({w[0]},{w[1]},{w[2]}), thread ({w[3]},{w[4]},{w[5]})"
            raise EmuError(f"kernel {self.name}, {who}: argument {i} ({self.params[i].name}) element {elem} "
                           f"differs between the {self.module.schedules[0]} and {order} thread orders "
                           f"(last written by that thread in the forward order): a race, e.g. a missing "
                           f"__syncthreads")


def _check_launch(kernel: str, grid, block, shared_mem: int) -> None:
    """The limits a real launch fails on (sm_80..sm_90) instead of running."""
    if not 0 < block[0] * block[1] * block[2] <= 1024 or block[2] > 64:
        raise EmuError(f"kernel {kernel}: block {block} is not a valid CUDA block (1..1024 threads, z <= 64)")
    if not (0 < grid[0] < 2**31 and 0 < grid[1] <= 65535 and 0 < grid[2] <= 65535):
        raise EmuError(f"kernel {kernel}: grid {grid} is not a valid CUDA grid (x < 2^31, y and z <= 65535)")
    if shared_mem > 48 * 1024:
        raise EmuError(f"kernel {kernel}: {shared_mem} bytes of dynamic shared memory is over the 48 KiB "
                       "a launch gets without cudaFuncSetAttribute")


def _dims(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


class EmuModule:
    """CuPy's RawModule, emulated: `EmuModule(code=..., options=('-I...',))`."""

    def __init__(self, code: str, options: tuple[str, ...] = (), schedules=SCHEDULES, variant: str = "O2",
                 seed: int = 1234):
        path, self.signatures = build(code, tuple(options), variant)
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.schedules, self.seed, self.variant = tuple(schedules), seed, variant

    def get_function(self, name: str) -> EmuFunction:
        if name not in self.signatures:
            raise EmuError(f"no extern \"C\" kernel named {name} in the module")
        return EmuFunction(self, name, self.signatures[name])


class EmuLauncher:
    """The launcher the CuPy backend takes, for the CPU: numpy views of CPU tensors, no streams."""

    device = "cpu"

    def __init__(self, code: str, options: tuple[str, ...] = (), **kw):
        self.module = EmuModule(code, options, **kw)

    def get_function(self, name: str) -> EmuFunction:
        return self.module.get_function(name)

    @staticmethod
    def array(t):
        import torch  # only this adapter needs torch; the emulator itself takes numpy

        t = t.detach()
        # numpy has no bfloat16: the same bytes as int16 (a kernel only sees a pointer)
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

    @staticmethod
    def stream():
        return nullcontext()
