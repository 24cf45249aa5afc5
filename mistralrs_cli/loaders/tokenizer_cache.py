"""Where built tokenizers are cached, and an early start on loading a cached SentencePiece one.

A GGUF's tokenizer is built once and cached under `cache_root()/tokenizers/<file key>`, the key
being the file's resolved path, size and modification time (loaders/tokenizer.py writes and
reads it). Loading Gemma-3's cached vocabulary into `sentencepiece` (262k pieces) still takes
~50 ms of CPU, in C that lets go of Python's lock. `prefetch_gguf_tokenizer` starts that load on
a thread as soon as the command line is parsed, so it overlaps the ~0.2 s of Python imports
before the model loads (the second CPU is idle then); `take_prefetched` hands the processor over
only when it was built from exactly the bytes the cache holds at load time.

This module imports only the standard library: run.py calls it before anything heavy loads.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

SPM_FILE = "tokenizer.model"  # a SentencePiece vocabulary's cache file (tokenizer.py writes it)


def cache_root() -> Path:
    root = os.environ.get("MISTRALRS_CLI_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mistralrs-cli"


def file_key(path: Path) -> str:
    """A file's identity for caches: its resolved path, size and modification time."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def tokenizer_cache_dir(path: Path) -> Path:
    """The cache directory of the tokenizer built from this GGUF file's metadata."""
    return cache_root() / "tokenizers" / file_key(path)


class _Prefetch:
    """One SentencePiece load on its own thread: the bytes it read and the processor (or None)."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.data: bytes | None = None
        self.sp: Any = None
        # not a daemon: an early exit waits for it rather than finalizing under a C++ call
        self.thread = threading.Thread(target=self._run, name="tokenizer-prefetch")
        self.thread.start()

    def _run(self) -> None:
        try:
            from sentencepiece import SentencePieceProcessor

            self.data = (self.cache_dir / SPM_FILE).read_bytes()
            self.sp = SentencePieceProcessor(model_proto=self.data)
        except Exception:  # noqa: BLE001 (the load then reads the cache itself, and says why)
            self.sp = None


_pending: _Prefetch | None = None
_lock = threading.Lock()


def prefetch_gguf_tokenizer(spec: Any, load_opts: Any) -> None:
    """Start loading the cached SentencePiece vocabulary of the GGUF file `spec` names, when it
    is a local file whose tokenizer comes from its own metadata and one is cached (else nothing)."""
    global _pending
    from ..types import GGUFSpec

    if (type(spec) is not GGUFSpec or spec.tok_model_id or spec.tokenizer_json
            or getattr(load_opts, "tp", 1) != 1):
        return
    try:  # as hub.resolve_model_file finds a local file; a repo id is left to the load
        path = Path(spec.quantized_filename).expanduser()
        if spec.quantized_model_id is not None:
            path = Path(spec.quantized_model_id).expanduser() / spec.quantized_filename
        if not path.is_file():
            return
        cache_dir = tokenizer_cache_dir(path)
        if not (cache_dir / SPM_FILE).is_file():
            return
    except (OSError, ValueError):
        return
    with _lock:
        if _pending is None:
            _pending = _Prefetch(cache_dir)


def take_prefetched(cache_dir: Path, data: bytes) -> Any:
    """The processor prefetched for `cache_dir` if it was built from these very bytes, else None.
    Any prefetch is finished and dropped either way."""
    global _pending
    with _lock:
        pending, _pending = _pending, None
    if pending is None:
        return None
    pending.thread.join()
    if pending.cache_dir != cache_dir or pending.data != data:
        return None
    return pending.sp


def discard_prefetched() -> None:
    """Drop a prefetch the load did not use (a cache it could not read, another file)."""
    take_prefetched(Path(), b"")
