"""Each sequence's grammar state: an llguidance matcher and its next-token mask, computed on a
worker thread while the engine runs the next forward pass.

The engine consumes each sampled token on its own thread (a few microseconds, so it knows at
once whether the grammar is finished); the sequence then waits in a batch, and at the end of the
step (Engine.step calls `flush`) one job computes every waiting sequence's mask on the worker
thread: llguidance's executor fills them in parallel with the GIL released, while the engine
thread goes on into the forward pass. `allowed` collects the mask when the logits are there.

One job per step, not per sequence, and plain queue.SimpleQueue hand-offs: each hand-off between
Python threads can cost a GIL switch, and a ThreadPoolExecutor's Python-level locks made the
engine thread wait ~4 ms per submit on a busy machine.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_batch: list["SeqGrammar"] = []  # consumed this step, mask not yet computing (under _lock: a
_lock = threading.Lock()          # process may run several engines, each on its own thread)
_worker: list[Any] = []  # [thread, llguidance.LLExecutor] once the first grammar request came


def _work(executor: Any) -> None:
    while True:
        seqs = _jobs.get()
        try:
            masks = _masks(executor, seqs)
        except BaseException as e:  # noqa: BLE001 - handed to the engine thread, which raises it
            for s in seqs:
                s._done.put((False, e))
            continue
        for s, m in zip(seqs, masks):
            s._done.put((True, m))


def _masks(executor: Any, seqs: list["SeqGrammar"]) -> list[np.ndarray]:
    words = np.empty((len(seqs), seqs[0].words), dtype=np.int32)  # (B, vocab / 32)
    executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(seqs)], words.ctypes.data,
                                     words.shape[1] * 4, len(seqs))  # GIL released, threads in Rust
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").view(np.bool_)
    return list(bits)


def _start_worker() -> None:
    import llguidance

    with _lock:
        if not _worker:  # the first grammar request; never on the load path
            executor = llguidance.LLExecutor()
            t = threading.Thread(target=_work, args=(executor,), name="grammar-masks", daemon=True)
            t.start()
            _worker.extend([t, executor])


def flush() -> None:
    """Start computing the masks of every sequence that consumed a token since the last flush
    (one job per vocabulary size: batches of one model's sequences)."""
    if not _batch:
        return
    if not _worker:
        _start_worker()
    by_words: dict[int, list[SeqGrammar]] = {}
    with _lock:
        for s in _batch:
            s._state = "computing"
            by_words.setdefault(s.words, []).append(s)
        _batch.clear()
    for seqs in by_words.values():
        _jobs.put(seqs)


class GrammarFailed(RuntimeError):
    """The matcher could not go on (a resource limit, or a token it refused): the request fails."""


class SeqGrammar:
    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # the worker's (ok, mask or error)
        self._state = "idle"  # "waiting" in _batch, "computing" on the worker, "ready" (_mask set)
        self._mask: np.ndarray | None = None
        self._queue()
        flush()  # the first mask computes while the prompt is prefilled

    def _queue(self) -> None:
        with _lock:
            self._mask, self._state = None, "waiting"
            _batch.append(self)

    def _collect(self) -> None:
        """Wait for this sequence's mask, if one is on its way."""
        if self._state == "waiting":
            flush()
        if self._state in ("waiting", "computing"):
            self._state = "ready"
            ok, value = self._done.get()
            if not ok:
                raise value
            self._mask = value

    def allowed(self) -> np.ndarray:
        """The tokens the grammar allows next (bool per token id; EOS only where it accepts)."""
        if self._state == "idle":
            self._queue()
        self._collect()
        self._check()
        return self._mask

    def draft_masks(self, tokens: list[int]) -> list[np.ndarray]:
        """Speculative decoding: the mask now and after each draft token, as far as the grammar
        allows them (a disallowed draft token is rejected there, so no mask follows it); the
        matcher is rolled back to where it was."""
        masks, n = [self.allowed()], 0
        for tok in tokens:
            if not (0 <= tok < masks[-1].size and masks[-1][tok]) or not self.matcher.consume_token(int(tok)):
                break  # checked against the mask first: a refused token would poison the matcher
            n += 1
            masks.append(self._now())
        if n:
            self.matcher.rollback(n)
        return masks

    def _now(self) -> np.ndarray:
        words = np.empty(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)  # GIL released
        return np.unpackbits(words.view(np.uint8), bitorder="little").view(np.bool_)

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; True when the grammar is finished (nothing but EOS may
        follow), else the sequence waits for the step's flush to compute its next mask."""
        if self._state == "waiting":  # a run of accepted draft tokens: skip the masks between them
            with _lock:
                if self._state == "waiting":
                    _batch.remove(self)
                    self._state = "idle"
        self._collect()  # never touch the matcher while the worker computes with it
        if not self.matcher.consume_token(int(token)):
            self._check()
        self._mask, self._state = None, "idle"
        if self.matcher.is_stopped():
            return True
        self._queue()
        return False

    def _check(self) -> None:
        if self.matcher.is_error():
            err = self.matcher.get_error().split("\n<state>")[0].strip()
            raise GrammarFailed(f"the grammar could not continue: {err}")
