"""The repacked weights' arena (backends/native.py _Arena): a chunk asks for transparent huge
pages only after the repack has written it (the kernel's VMA flags in /proc/self/smaps say "hg"
for MADV_HUGEPAGE), and the repacked bytes are what the kernels read (the product equals the
product from gguf's dequantized blocks)."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, dequantize, quantize

from mistralrs_cli.backends import native

pytestmark = [pytest.mark.skipif(native.library() is None, reason="no native library (no C compiler)"),
              pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                                 reason="transparent huge pages are a Linux madvise")]


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding this address."""
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, "no mapping holds the address"
    return flags


def test_chunk_marked_for_huge_pages_after_it_is_written():
    arena = native._Arena()
    a = arena.alloc(1 << 20)
    assert "hg" not in vm_flags(a.ctypes.data)  # written (faulted) on 4 KB pages first
    a[:] = 7
    arena.settle()
    assert "hg" in vm_flags(a.ctypes.data)
    assert int(a.sum()) == 7 << 20


def test_plans_at_once_settles_and_multiplies_like_the_dequantized_blocks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    raw = quantize(w, Q.Q8_0)  # gguf's own quantizer
    lib = native.library()
    plan = native.plans_at_once([(raw, Q.Q8_0, 64, False)], lib)[0]
    assert plan.array[0].type & native.PACKED
    assert "hg" in vm_flags(plan.tensors[0].ctypes.data)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = native.qmatmul(x, plan, lib, native.qmm_opts(precise=True))
    ref = x.astype(np.float64) @ dequantize(raw, Q.Q8_0).astype(np.float64).T
    assert np.abs(y - ref).max() < 1e-3 * np.abs(ref).max()
