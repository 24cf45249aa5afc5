"""The engine on its own thread: the only thread that touches the model and the KV cache.

Callers (the server's event loop, tests, scripts) submit requests and aborts through a
thread-safe inbox; each request's RequestOutput deltas go to that request's sink (a callable
run on the engine thread: put into a queue.Queue, or hand to an asyncio loop).

No request can end the thread: an exception while adding or stepping one request fails that
request alone (Engine.step isolates forward passes and sampling per request). An exception the
engine cannot pin on one request (its scheduler or cache bookkeeping) leaves it in a state it
cannot trust, so the thread then fails: every request in flight or queued gets an "error"
output, `failure` says why, later submits raise EngineFailed, and `on_failure` is called (the
server stops itself with it).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Callable, Iterator

from ..errors import UserError
from ..types import SamplingParams
from .engine import Engine
from .request import RequestOutput

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput], None]
_ids = itertools.count()


class QueueFull(Exception):
    pass


class EngineFailed(Exception):
    """The engine thread has failed: nothing more will run."""


class EngineThread:
    def __init__(self, engine: Engine, max_pending: int = 1024):
        self.engine, self.max_pending = engine, max_pending
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._pending = 0  # submitted, not yet finished (read from other threads: approximate)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stopping = False
        self.failure: str | None = None  # why the engine thread failed; None while it is healthy
        self.on_failure: Callable[[str], None] | None = None  # called once, on the engine thread
        hooks = getattr(engine.model, "fault_hooks", None)  # --tp: a lost rank (distributed/comm.py)
        if hooks is not None:
            hooks.append(self._fail_from_outside)
        self._thread.start()

    # ---- any thread ----
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               request_id: str | None = None, images=None) -> str:
        """Queue a request; raises UserError for a prompt the engine cannot take. images: the
        prompt's PromptImages (vision/prompt.py), for a vision model."""
        ids = self.engine._fit_prompt(list(prompt_ids), images)  # pure: safe off the engine thread
        rid = request_id or f"r{next(_ids)}"
        with self._lock:  # put under the lock: a failing thread drains the inbox under it
            self._check_alive()
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are already queued")
            self._pending += 1
            self._inbox.put(("add", rid, ids, params, sink, images))
        return rid

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise EngineFailed(f"the engine failed ({self.failure})")

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def cancel_all(self) -> None:
        """Cancel every request in flight (shutdown): each stream gets its final output."""
        self._inbox.put(("abort_all",))

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps; returns its result (or raises)."""
        done: queue.Queue = queue.Queue()
        with self._lock:
            self._check_alive()
            self._inbox.put(("call", fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def stream(self, prompt_ids: list[int], params: SamplingParams, images=None) -> Iterator[RequestOutput]:
        """A blocking iterator over one request's deltas; closing it early aborts the request."""
        q: queue.Queue = queue.Queue()
        rid = self.submit(prompt_ids, params, q.put, images=images)
        finished = False
        try:
            while not finished:
                out = q.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is in flight and end the thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def _fail_from_outside(self, reason: str) -> None:
        """Another thread found that the engine cannot go on (--tp: a rank was lost; the engine
        thread may be stuck in a collective): refuse new work now (the server answers 503) and
        tell the owner; the process exits soon after."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure, self._stopping = reason, True
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("the engine's on_failure callback failed")

    # ---- the engine thread ----
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - whatever it was, nobody may hang on it
            self._die(e)

    def _run(self) -> None:
        stop = False
        while True:
            block = not self.engine.has_unfinished() and not stop
            try:
                while True:
                    stop = self._handle(self._inbox.get(block=block)) or stop
                    block = False
            except queue.Empty:
                pass
            if stop:
                for rid in list(self._sinks):
                    self.engine.abort(rid)
            if not self.engine.has_unfinished():
                if stop:
                    return
                continue
            for out in self.engine.step():  # raises only for what no one request caused
                self._deliver(out)

    def _die(self, err: BaseException) -> None:
        """Fail everything in flight or queued, refuse what comes later, tell the owner."""
        log.critical("the engine thread failed; every request now fails", exc_info=err)
        reason = f"{type(err).__name__}: {err}"
        with self._lock:
            self.failure, self._stopping = reason, True
            inbox = []
            while True:
                try:
                    inbox.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        error = EngineFailed(f"the engine failed ({reason}); the server is stopping")
        for msg in inbox:
            if msg[0] == "add":
                self._sinks[msg[1]] = msg[4]
            elif msg[0] == "call":
                msg[2].put((False, error))
        for rid in list(self._sinks):
            try:
                self._deliver(RequestOutput(rid, None, f"internal error: {error}", "error", error=error))
            except Exception:  # its sink's abort touched the broken engine: the sink got its error
                pass
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("the engine's on_failure callback failed")

    def _handle(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "add":
            _, rid, ids, params, sink, images = msg
            self._sinks[rid] = sink
            try:  # add_request puts the request in the scheduler last: on error it holds nothing
                self.engine.add_request(ids, params, rid, images=images)
            except Exception as e:  # a UserError is the client's mistake, anything else a bug
                if not isinstance(e, UserError):
                    log.error("adding request %s failed", rid, exc_info=e)
                text = str(e) if isinstance(e, UserError) else f"internal error: {type(e).__name__}: {e}"
                self._deliver(RequestOutput(rid, None, text, "error", error=e))
        elif kind == "abort":
            self.engine.abort(msg[1])
        elif kind == "abort_all":
            for rid in list(self._sinks):
                self.engine.abort(rid)
        elif kind == "call":
            _, fn, done = msg
            try:
                done.put((True, fn(self.engine)))
            except Exception as e:
                done.put((False, e))
        return kind == "stop"

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finish_reason is not None:
            self._sinks.pop(out.request_id, None)
            with self._lock:
                self._pending -= 1
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # the consumer went away (e.g. its event loop closed)
            self.engine.abort(out.request_id)
