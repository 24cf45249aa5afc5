"""One sequence's grammar state: an llguidance matcher and its next-token mask, computed on a
worker thread while the engine runs the forward pass.

The engine consumes a sampled token (consume: a few tens of microseconds, on its own thread, so
it knows at once whether the grammar is finished) and the mask for the next token starts
computing right away on the worker pool; llguidance releases the GIL while it walks the
vocabulary, so the mask is ready by the time the next step's logits are, and `allowed` only
collects it.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # first grammar request; never on the load path
        _pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="grammar")
    return _pool


class GrammarFailed(RuntimeError):
    """The matcher could not go on (a resource limit, or a token it refused): the request fails."""


class SeqGrammar:
    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32
        self._next: Future | None = None
        self.start()  # the first mask computes while the prompt is prefilled

    def start(self) -> None:
        """Compute the mask for the next token on the worker pool."""
        self._next = _workers().submit(self._compute)

    def _compute(self) -> np.ndarray:
        words = np.empty(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)  # GIL released
        return np.unpackbits(words.view(np.uint8), bitorder="little").view(np.bool_)

    def _wait(self) -> np.ndarray | None:
        fut, self._next = self._next, None
        return fut.result() if fut is not None else None

    def allowed(self) -> np.ndarray:
        """The tokens the grammar allows next (bool per token id; EOS only where it accepts)."""
        mask = self._wait()
        if mask is None:
            self.start()
            mask = self._wait()
        self._check()
        self._next = _done(mask)  # kept until consume: asked again, the same mask
        return mask

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; True when the grammar is finished (nothing but EOS may
        follow), else the next mask starts computing."""
        self._wait()  # never touch the matcher while the worker computes with it
        if not self.matcher.consume_token(int(token)):
            self._check()
        if self.matcher.is_stopped():
            return True
        self.start()
        return False

    def _check(self) -> None:
        if self.matcher.is_error():
            err = self.matcher.get_error().split("\n<state>")[0].strip()
            raise GrammarFailed(f"the grammar could not continue: {err}")


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
