"""Repacked weights kept on disk, so a later start reads them back instead of repacking.

One file per GGUF path under the cache dir (MISTRALRS_CLI_CACHE, else ~/.cache/mistralrs-cli) in
native/repack/: a header (magic, a digest of everything the packed bytes depend on, their length)
then each repack job's output in job order. The digest covers the GGUF file's identity (resolved
path, size, mtime, inode), the numerics mode, the compiled kernel library (its name hashes the C
sources and the CPU's flags, so another CPU flavour or packed.c change misses) and the job layout.
A file whose header or size disagrees is ignored and rewritten; it is written to a temp file and
renamed, so a reader never sees half of one. The bytes are read into the caller's buffers (the
huge-page arena the kernels stream from), not mapped: a file mapping would get 4 KB pages.
MISTRALRS_CLI_NO_REPACK_CACHE=1 turns it off. Models whose repacked weights are under MIN_BYTES
are not cached: their repack takes milliseconds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VERSION = 1
MAGIC = b"MRSRPK%02d" % VERSION
HEADER = 64  # magic (8) + digest (32) + payload bytes (8) + zero padding
MIN_BYTES = 16 << 20


def locate(source: Path, tag: str, lib_name: str, layout: list[tuple], cache_dir: Path) -> tuple[Path, bytes] | None:
    """(cache file, digest) for these jobs, or None when caching is off or the source is unreadable."""
    if os.environ.get("MISTRALRS_CLI_NO_REPACK_CACHE"):
        return None
    try:
        src = source.resolve()
        st = src.stat()
    except OSError:
        return None
    ident = repr((VERSION, str(src), st.st_size, st.st_mtime_ns, st.st_ino, tag, Path(lib_name).name, layout))
    name = hashlib.sha256(str(src).encode()).hexdigest()[:24]
    return cache_dir / "repack" / f"{name}.bin", hashlib.sha256(ident.encode()).digest()


def _header(digest: bytes, total: int) -> bytes:
    return (MAGIC + digest + total.to_bytes(8, "little")).ljust(HEADER, b"\0")


def read(path: Path, digest: bytes, outs: list[np.ndarray]) -> bool:
    """Fill outs from the cache file; False (outs partly written) when it is absent, stale or short."""
    total = sum(o.nbytes for o in outs)
    try:
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != HEADER + total or f.read(HEADER) != _header(digest, total):
                return False
            for o in outs:
                view, done = memoryview(o).cast("B"), 0
                while done < o.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        return False
                    done += n
    except OSError:
        return False
    return True


def write(path: Path, digest: bytes, outs: list[np.ndarray]) -> None:
    """Store outs atomically (temp file + rename); a failure only costs the next start a repack."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_header(digest, sum(o.nbytes for o in outs)))
                for o in outs:
                    f.write(memoryview(o).cast("B"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.info("repacked weights not cached (%s)", e)
