"""Hand-serialized GGUF files for hostile-input tests: any value, any tensor table, no checks.

`read_parts` takes a valid file apart with gguf-py's own GGUFReader (independent of our reader);
`write_parts` writes it back byte by byte from the GGUF spec, so a test can set a key to any
type and value, give a tensor any dims, type or offset, or drop tensors -- things GGUFWriter
refuses to write. Nothing here is read by the package.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType as V

_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.UINT64: "<Q", V.INT64: "<q", V.FLOAT32: "<f", V.FLOAT64: "<d", V.BOOL: "<?"}


@dataclass
class KV:
    key: str
    vtype: V
    value: Any  # str/bytes for STRING; a list for ARRAY; raw `bytes` in `raw` override all
    item: V | None = None  # element type of an ARRAY
    raw: bytes | None = None  # the value's encoded bytes as is (after the type field)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order (innermost first)
    qtype: int
    data: bytes
    offset: int | None = None  # relative to the data section; None: packed, aligned


@dataclass
class Parts:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    alignment: int = 32
    trailing: bytes = field(default=b"")

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, vtype: V, value: Any, item: V | None = None) -> "Parts":
        self.kvs = [k for k in self.kvs if k.key != key] + [KV(key, vtype, value, item)]
        return self

    def drop(self, key: str) -> "Parts":
        self.kvs = [k for k in self.kvs if k.key != key]
        return self


def read_parts(path: str | Path) -> Parts:
    r = GGUFReader(str(path))
    kvs = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue  # the reader's pseudo-fields: version and counts
        vtype = V(f.types[0])
        item = V(f.types[-1]) if vtype == V.ARRAY else None
        value = f.contents()
        kvs.append(KV(f.name, vtype, value, item))
    tensors = [Tensor(t.name, [int(x) for x in t.shape], int(t.tensor_type), bytes(np.asarray(t.data).tobytes()))
               for t in r.tensors]
    align = next((int(k.value) for k in kvs if k.key == "general.alignment"), 32)
    return Parts(kvs, tensors, alignment=align)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: V, value: Any, item: V | None) -> bytes:
    if vtype == V.STRING:
        return _string(value)
    if vtype == V.ARRAY:
        body = b"".join(_value(item, x, None) for x in value)
        return struct.pack("<IQ", int(item), len(value)) + body
    return struct.pack(_FMT[vtype], value)


def encode(parts: Parts) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", parts.version, len(parts.tensors), len(parts.kvs)))
    for kv in parts.kvs:
        out += _string(kv.key) + struct.pack("<I", int(kv.vtype))
        out += kv.raw if kv.raw is not None else _value(kv.vtype, kv.value, kv.item)
    pos, offsets = 0, []
    align = parts.alignment if parts.alignment > 0 else 32
    for t in parts.tensors:
        pos = -(-pos // align) * align
        offsets.append(pos if t.offset is None else t.offset)
        pos += len(t.data)
    for t, off in zip(parts.tensors, offsets):
        out += _string(t.name) + struct.pack("<I", len(t.dims))
        out += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.qtype, off)
    out += bytes(-len(out) % align)
    pos = 0
    for t in parts.tensors:
        out += bytes(-pos % align)
        pos += -pos % align
        out += t.data
        pos += len(t.data)
    return bytes(out) + parts.trailing


def sections(parts: Parts) -> list[int]:
    """Byte bounds of encode(parts)'s sections: [0, end of header, end of KVs, end of tensor table]."""
    kvs = sum(len(_string(k.key)) + 4 + len(k.raw if k.raw is not None else _value(k.vtype, k.value, k.item))
              for k in parts.kvs)
    table = sum(len(_string(t.name)) + 4 + 8 * len(t.dims) + 12 for t in parts.tensors)
    return [0, 24, 24 + kvs, 24 + kvs + table]


def fresh_cache(d: Path) -> Path:
    """A fresh MISTRALRS_CLI_CACHE (tokenizers built from test files stay out of the user's) that
    shares the user's compiled native kernels, so no load waits for a compile."""
    d.mkdir(parents=True, exist_ok=True)
    root = os.environ.get("MISTRALRS_CLI_CACHE")
    native = (Path(root) if root else Path.home() / ".cache" / "mistralrs-cli") / "native"
    native.mkdir(parents=True, exist_ok=True)
    try:
        (d / "native").symlink_to(native, target_is_directory=True)
    except FileExistsError:
        pass
    return d


def write_parts(path: str | Path, parts: Parts) -> Path:
    Path(path).write_bytes(encode(parts))
    return Path(path)


def nested_array(depth: int) -> bytes:
    """The encoded value of an ARRAY nested `depth` deep (each holds one array; the innermost
    holds no uint8s), as the bytes after a KV's type field."""
    one = struct.pack("<IQ", int(V.ARRAY), 1)
    return one * depth + struct.pack("<IQ", int(V.UINT8), 0)
