"""Request bodies a hostile client cannot use to stall the server: the size is capped before the
body is read (413), and everything slow (checking the nesting depth, json.loads, rendering the
chat template, tokenizing) runs in a worker thread, so the event loop keeps answering /health and
other clients meanwhile."""
from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any, Callable

import numpy as np
from fastapi import Request

from .protocol import ApiError

# past the cap the rest of the body is read and dropped (so the client, which is still sending,
# gets the 413 rather than a reset connection), but only up to this much: then the connection closes
DRAIN_BYTES = 256 << 20
OFF_LOOP_THREADS = 4  # parses and template renders at once; more wait (on the loop, asleep)

# a JSON string literal, unrolled so that long strings cost one fast character-class run
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800..\udfff: half of a UTF-16 pair


def too_large(size: int, limit: int, exact: bool) -> ApiError:
    size_text = f"{size} bytes" if exact else f"more than {limit} bytes"
    return ApiError(413, f"the request body is {size_text}, over --max-body-bytes ({limit}); send "
                         "less or start the server with a larger --max-body-bytes.",
                    code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 before more than `limit` bytes are kept (Content-Length is trusted to
    refuse early; a chunked body is counted as it arrives)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    if size > limit:
        await _drain(request, 0)
        raise too_large(size, limit, exact=True)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            await _drain(request, size)
            raise too_large(size, limit, exact=False)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, size: int) -> None:
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_BYTES:
                return
    except Exception:  # the stream was consumed already, or the client hung up: nothing to drain
        return


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw` (UTF-8 JSON), without recursing: strings are cut
    out (a regex), every byte but brackets dropped (bytes.translate), the running sum's maximum
    taken (numpy), all at C speed, so a 16 MB body costs milliseconds."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"the request body has {name}, which is not JSON; send numbers only.")


def parse_json(raw: bytes, max_depth: int) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it (call it off the loop)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 ({e.reason} at byte {e.start}); send "
                            "JSON encoded as UTF-8.") from None
    if json_depth(raw) > max_depth:
        raise ApiError(400, f"the request body nests JSON deeper than --max-json-depth ({max_depth}) "
                            "levels; flatten it or start the server with a larger --max-json-depth.")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
    except RecursionError:  # the depth check above should have caught it; never a 500
        raise ApiError(400, "the request body nests JSON too deeply; flatten it.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(raw):  # pairs are fine; a lone half is no text a tokenizer takes
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"the request body has a lone UTF-16 surrogate ({e.object[e.start]!r}) "
                                "in a string; send valid Unicode text.") from None
    return body


class OffLoop:
    """Run blocking calls in daemon threads, at most OFF_LOOP_THREADS at once. Daemon threads, not
    asyncio.to_thread's pool: the interpreter joins that pool's threads at exit, so one render
    that never ends would keep a SIGTERMed server alive."""

    def __init__(self, threads: int = OFF_LOOP_THREADS):
        self.threads = threads
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._slots is None:  # made on the server's loop
            self._slots = asyncio.Semaphore(self.threads)
        async with self._slots:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def settle(ok: bool, value: Any) -> None:
                if not fut.done():  # the awaiting request may have been cancelled meanwhile
                    (fut.set_result if ok else fut.set_exception)(value)

            def run() -> None:
                try:
                    ok, value = True, fn(*args)
                except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                    ok, value = False, e
                try:
                    loop.call_soon_threadsafe(settle, ok, value)
                except RuntimeError:  # the loop closed (shutdown): nobody waits for it
                    pass

            threading.Thread(target=run, name="request-body", daemon=True).start()
            return await fut
