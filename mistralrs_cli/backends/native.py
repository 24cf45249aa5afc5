"""The CPU kernels of csrc/qmatmul.c, built on first use with the system's C compiler.

`cc -O3 -march=native -fopenmp` into the cache directory, keyed by the source and the machine,
then loaded with ctypes. No compiler, or a failed build, means None: the torch path serves.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "qmatmul.c"
TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0})
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cache_dir() -> Path:
    root = os.environ.get("MISTRALRS_CLI_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mistralrs-cli") / "native"


def _cpu_flags() -> bytes:
    """-march=native code is only valid on a CPU with the same features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()


def build(extra_flags: tuple[str, ...] = (), cache: Path | None = None) -> ctypes.CDLL | None:
    """Compile (once per source, machine and flags) and load; None without a working compiler.
    Tests pass extra_flags=("-mno-avx2",) to exercise the portable scalar path."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or os.environ.get("MISTRALRS_CLI_NO_NATIVE"):
        return None
    src = SOURCE.read_bytes()
    ident = src + platform.machine().encode() + _cpu_flags() + " ".join(extra_flags).encode()
    lib = (cache or _cache_dir()) / f"qmatmul-{hashlib.sha256(ident).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            cmd = [cc, "-O3", "-march=native", *extra_flags, "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                   str(SOURCE), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log.info("native CPU kernels not built (%s); using torch", proc.stderr.strip()[:200])
                return None
            out.replace(lib)  # atomic: concurrent builds never load a half-written file
    so = ctypes.CDLL(str(lib))
    so.qmm.restype = ctypes.c_int
    so.qmm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return so


def library() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        try:
            _LIB = build()
        except OSError as e:
            log.info("native CPU kernels unavailable (%s); using torch", e)
            _LIB = None
    return _LIB


def qmatmul(x: torch.Tensor, parts: list[tuple[torch.Tensor, Q, int]], lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) f32 times the stacked weights [(raw rows, qtype, rows)] -> (M, sum rows) f32."""
    lib = lib or library()
    x = x.contiguous()
    m, k = x.shape
    n_total = sum(rows for _, _, rows in parts)
    y = torch.empty(m, n_total, dtype=torch.float32)
    col = 0
    threads = torch.get_num_threads()
    for raw, qtype, rows in parts:
        rc = lib.qmm(int(qtype), raw.data_ptr(), rows, k, x.data_ptr(), m, y.data_ptr() + 4 * col, n_total, threads)
        if rc != 0:
            raise RuntimeError(f"native qmm refused type {qtype.name} with K={k}")
        col += rows
    return y
