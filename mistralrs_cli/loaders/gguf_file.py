"""A fast GGUF header reader: metadata and tensor table, tensors memory-mapped.

Why not gguf.GGUFReader: it builds a numpy view per array element, which takes ~16 s on
Gemma-3's 262,144-token vocabulary. This reader parses the same header in a fraction of a
second; the gguf package still supplies the constants (value types, quant block sizes) and is the
reference the tests compare this reader against, field for field.
"""
from __future__ import annotations

import math
import mmap
import os
import resource
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import UserError
from ..hub import short_path

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME = 64  # ggml's GGML_MAX_NAME (with the terminating zero)
MAX_NESTING = 16  # arrays of arrays: real files nest at most twice; deeper only exhausts the stack
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}  # an element's smallest encoding
_U64 = struct.Struct("<Q")

# scalar GGUF value types -> struct format
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.FLOAT64: np.float64,
    GGUFValueType.BOOL: np.bool_,
}


class _Truncated(Exception):
    pass


class _Malformed(Exception):
    """A header value no GGUF writer produces: the message says which and why."""


@dataclass
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (outermost first), i.e. GGUF dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def lazy_strings(self, count: int) -> "_LazyStrings":
        """Skip `count` strings, reading only their lengths; decode them on first use."""
        start, pos, buf, length = self.pos, self.pos, self.buf, _U64.unpack_from
        try:  # the hot loop of a header read (262k strings for Gemma-3): no test per string
            for _ in range(count):
                pos += 8 + length(buf, pos)[0]
        except (struct.error, OverflowError):  # a length read past the end (or past any offset)
            raise _Truncated() from None
        if pos > len(buf):
            raise _Truncated()
        self.pos = pos
        return _LazyStrings(buf, start, count)

    def value(self, vtype: int, depth: int = 0) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise _Malformed(f"an array nests arrays more than {MAX_NESTING} deep")
            item_type, count = GGUFValueType(self.take("<I")), self.take("<Q")
            # the count is checked against the bytes left before any list grows toward it
            least = _MIN_BYTES.get(item_type) or np.dtype(_NUMPY[item_type]).itemsize
            if self.pos + count * least > len(self.buf):
                raise _Truncated()
            if item_type == GGUFValueType.STRING:
                if count >= _LAZY_STRINGS:
                    return self.lazy_strings(count)
                return [self.string() for _ in range(count)]
            if item_type == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY, depth + 1) for _ in range(count)]
            dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise _Truncated()
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos = end
            return arr
        return self.take(_SCALAR[vtype])


_LAZY_STRINGS = 4096  # string arrays this long (vocabularies, merges) are decoded on first use


class _LazyStrings(Sequence):
    """A GGUF string array decoded when first read: a tokenizer built from the file's vocabulary
    is cached, so most loads never look at the 50k-260k token strings."""

    def __init__(self, buf: memoryview, start: int, count: int):
        self._buf, self._start, self._count = buf, start, count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            cur = _Cursor(self._buf)
            cur.pos = self._start
            self._items = [cur.string() for _ in range(self._count)]
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        return self._decoded()[i]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def _tensor_info(cur: _Cursor) -> TensorInfo:
    """One tensor-table entry, its offset still relative to the data section. Its dims are
    checked here, before any size is computed from them."""
    name = cur.string()
    # ggml's names are short C strings; a name that is not (or holds a newline) is damage, and
    # refusing it here keeps every later message that names a tensor on one line
    if len(name.encode()) >= MAX_NAME or not name.isprintable():
        raise _Malformed(f"the tensor name {name[:80]!r} is not a printable name of under {MAX_NAME} bytes")
    n_dims = cur.take("<I")
    if n_dims > MAX_DIMS:
        raise _Malformed(f"tensor {name[:80]} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [cur.take("<Q") for _ in range(n_dims)]
    qtype = GGMLQuantizationType(cur.take("<I"))
    offset = cur.take("<Q")
    if qtype not in GGML_QUANT_SIZES:
        raise _Malformed(f"tensor {name[:80]} has type {qtype.name}, which no longer has a layout")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if 0 in dims:
        raise _Malformed(f"tensor {name[:80]} has a dimension of 0 ({dims})")
    n = math.prod(dims)
    if n >= 1 << 63:  # ggml counts elements in int64
        raise _Malformed(f"tensor {name[:80]} has dimensions {dims}, more elements than ggml can count")
    if (dims[0] if dims else 1) % block:
        raise _Malformed(f"tensor {name[:80]} has rows of {dims[0] if dims else 1} values, not whole "
                         f"{qtype.name} blocks of {block}")
    return TensorInfo(name, qtype, tuple(reversed(dims)), offset, n // block * type_size)


def memory_limit() -> int:
    """Bytes this process can hold: the machine's physical memory, or less under an
    address-space limit (ulimit -v)."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 1 << 62  # unknown (not POSIX): no check
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return phys if soft == resource.RLIM_INFINITY else min(phys, soft)


def check_fits_memory(path: Path, size: int) -> None:
    """Every loader repacks a file's weights into memory, so a file bigger than the memory this
    process can hold cannot load: say so before mapping it (a mapping that big fails or, worse,
    the repack is killed by the OOM killer midway)."""
    limit = memory_limit()
    if size > limit:
        raise UserError(f"{path} is {size / 1e9:.1f} GB but this process can use at most "
                        f"{limit / 1e9:.1f} GB of memory; use a smaller (more quantized) file or a "
                        "machine with more memory.")


class GGUFFile:
    """Metadata (dict of python values; numeric arrays as numpy) and memory-mapped tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"GGUF file {self.path} does not exist; check the -m/-f paths.") from None
        except OSError as e:  # a name too long, a permission: the OS's reason, on one line
            raise UserError(f"cannot read GGUF file {short_path(self.path)} ({e.strerror or e}); "
                            "check the -m/-f paths.") from None
        if size == 0:
            raise UserError(f"{self.path} is empty (0 bytes), not a GGUF model; re-download it.")
        check_fits_memory(self.path, size)
        try:
            # copy-on-write map: torch wants writable arrays, pages stay shared with the page cache
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot map {self.path} into memory ({e}); check the file and the "
                            "memory available.") from None
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise UserError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); "
                            "pass a .gguf model file.")
        try:
            self._parse(memoryview(self._map))
        except _Truncated:
            raise UserError(f"{self.path} is truncated: its header ends early; "
                            "re-download the file.") from None
        except _Malformed as e:
            raise UserError(f"{self.path} has a malformed GGUF header: {e}; the file is damaged "
                            "or was written by a broken converter.") from None
        except ValueError as e:  # unknown value type or tensor type enum
            raise UserError(f"{self.path} has a malformed or unsupported GGUF header ({e}).") from None

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf)
        cur.pos = 4
        self.version = cur.take("<I")
        if self.version not in (2, 3):
            raise UserError(f"{self.path} is GGUF version {self.version}; only versions 2 and 3 "
                            "are supported.")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        # a key-value pair takes at least 13 bytes, a tensor entry 24: counts the file cannot
        # hold are refused before any loop runs toward them
        if cur.pos + 13 * n_kv + 24 * n_tensors > len(buf):
            raise _Truncated()
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.metadata:  # as llama.cpp: which of the two would count is a guess
                raise _Malformed(f"the key {key[:80]!r} appears twice")
            self.metadata[key] = cur.value(cur.take("<I"))
        infos = [_tensor_info(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise _Malformed(f"general.alignment is {str(align)[:40]}, not a positive power of two")
        self.data_offset = -(-cur.pos // align) * align
        self.tensors = self._place(infos, align, len(buf))

    def _place(self, infos: list[TensorInfo], align: int, size: int) -> dict[str, TensorInfo]:
        """The tensors at their absolute offsets, each inside the file and none overlapping
        another (so their bytes together are at most the file's size)."""
        tensors: dict[str, TensorInfo] = {}
        for info in infos:
            if info.name in tensors:
                raise _Malformed(f"the tensor name {info.name[:80]!r} appears twice")
            if info.offset % align:
                raise _Malformed(f"tensor {info.name}'s data offset {info.offset} is not a multiple "
                                 f"of the alignment {align}")
            info.offset += self.data_offset
            if info.offset + info.nbytes > size:
                raise UserError(f"{self.path} is truncated: tensor {info.name} needs bytes up to "
                                f"{info.offset + info.nbytes} but the file has {size}; "
                                "re-download the file.")
            tensors[info.name] = info
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise _Malformed(f"the data of tensors {a} and {b} overlap")
        return tensors

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def release(self) -> None:
        """Drop the file's pages from this process's memory (they are clean: re-read on demand).
        Called once every weight has its compute form; embedding lookups fault rows back in."""
        mm = getattr(self._map, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def raw_np(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 numpy array (rows, row_bytes), zero-copy from the mapping."""
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return np.asarray(self._map[info.offset:info.offset + info.nbytes]).reshape(rows, info.nbytes // rows)

    def raw(self, name: str):
        """The same bytes as a torch uint8 tensor (the torch loaders' form)."""
        import torch

        return torch.from_numpy(self.raw_np(name))
