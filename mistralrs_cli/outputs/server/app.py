"""The OpenAI-compatible routes (FastAPI). Requests go to the engine thread; each choice's
deltas come back through an asyncio queue and leave as JSON or as SSE chunks (one per token)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine.token_text import TokenText
from ...engine.worker import EngineFailed, EngineThread, QueueFull
from ...errors import UserError
from ...validation import Limits
from ..request_log import RequestLog
from ...tools.deltas import DeltaStream
from . import shapes
from .body import OffLoop, parse_json, read_body
from .protocol import ApiError, Parsed, parse_activation, parse_chat, parse_completion


@dataclass
class ServerState:
    worker: EngineThread
    loaded: Any
    api_key: str | None = None
    log: RequestLog | None = None
    reisq: Callable[[str], str] | None = None  # ISQ type -> message; raises ApiError
    limits: Limits = field(default_factory=Limits)  # --max-body-bytes, --max-n, ...


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Routes:
    """The handlers, sharing the server's state, the token-text table and the request log."""

    def __init__(self, state: ServerState):
        self.state, self.loaded = state, state.loaded
        self.tt = TokenText(state.loaded.tokenizer)
        self.log = state.log or RequestLog(None)
        self.off_loop = OffLoop()

    # ---- errors ----
    async def http_error(self, request: Request, exc: StarletteHTTPException):
        code = "unknown_url" if exc.status_code == 404 else None
        msg = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
               else str(exc.detail))
        return error_response(ApiError(exc.status_code, msg, code=code))

    async def api_error(self, request: Request, exc: ApiError):
        self.log.write("error", {"path": request.url.path, "status": exc.status, "message": exc.message})
        return error_response(exc)

    async def internal(self, request: Request, exc: Exception):
        self.log.write("error", {"path": request.url.path, "status": 500, "message": repr(exc)})
        return error_response(ApiError(500, f"internal error: {exc}", type_="server_error"))

    # ---- request bodies ----
    def check_key(self, request: Request) -> None:
        key = self.state.api_key
        if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "Incorrect or missing API key: send the header "
                                "'Authorization: Bearer <key>' with the key given to --api-key.",
                           code="invalid_api_key")

    def check_engine(self) -> None:
        failure = self.state.worker.failure
        if failure is not None:
            raise ApiError(503, f"the engine failed ({failure}); the server is stopping.",
                           type_="server_error", code="engine_failed")

    async def body_of(self, request: Request) -> dict:
        """The checked JSON body: capped in size while read, parsed off the event loop."""
        self.check_key(request)
        self.check_engine()
        raw = await read_body(request, self.state.limits.max_body_bytes)
        return await self.off_loop(self.parse_and_log, raw, request.url.path)

    def parse_and_log(self, raw: bytes, path: str) -> dict:  # a worker thread: both cost O(body)
        body = parse_json(raw, self.state.limits.max_json_depth)
        self.log.write("request", {"path": path, "body": body})
        return body

    # ---- routes ----
    async def health(self):
        failure = self.state.worker.failure
        if failure is None:
            return {"status": "ok"}
        err = ApiError(503, f"the engine failed ({failure}); the server is stopping.",
                       type_="server_error", code="engine_failed")
        return JSONResponse({"status": "failed", **err.body()}, status_code=503)

    async def models(self, request: Request):
        self.check_key(request)
        return {"object": "list", "data": [{"id": self.loaded.model_id, "object": "model",
                                            "created": int(time.time()), "owned_by": "local"}]}

    # parsing renders the chat template and tokenizes: off the loop, so a slow one stalls no one
    async def chat(self, request: Request):
        body = await self.body_of(request)
        return await self.complete(request, await self.off_loop(parse_chat, body, self.loaded,
                                                                self.state.limits))

    async def completions(self, request: Request):
        body = await self.body_of(request)
        return await self.complete(request, await self.off_loop(parse_completion, body, self.loaded,
                                                                self.state.limits))

    async def reisq(self, request: Request):
        body = await self.body_of(request)
        kind = body.get("ggml_type") or body.get("isq_type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(400, "send the quantization type as ggml_type or isq_type, e.g. "
                                '{"ggml_type": "Q4K"}.', "ggml_type")
        if self.state.reisq is None:
            raise ApiError(400, "in-situ quantization is not available for this model.", "ggml_type")
        return {"message": await asyncio.to_thread(self.state.reisq, kind)}

    async def activate_adapters(self, request: Request):
        """mistral.rs's POST /activate_adapters {"adapter_names": [...]}: the LoRA adapters of
        requests that name none from now on; requests already running keep theirs."""
        names = parse_activation(await self.body_of(request), self.loaded)

        def activate(engine) -> list[str]:  # on the engine thread, between steps
            engine.set_active_adapters(names)
            return list(engine.active_adapters)
        try:
            active = await asyncio.to_thread(self.state.worker.call, activate)
        except UserError as e:
            raise ApiError(400, str(e), "adapter_names") from None
        except EngineFailed as e:
            raise ApiError(503, f"{e}; the server is stopping.", type_="server_error", code="engine_failed") from None
        body = {"message": f"Adapter activation: {active}", "active_adapters": active}
        self.log.write("response", body)
        return body

    # ---- generation ----
    async def complete(self, request: Request, parsed: Parsed):
        rid = shapes.new_id(parsed.kind)
        pending = Pending(self.state.worker, parsed)
        if parsed.stream:
            return StreamingResponse(self.stream(parsed, rid, pending), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = await self.collect(request, parsed, pending)
        use = shapes.usage(sum(map(len, parsed.prompts)), choices)
        body = shapes.response(parsed.kind, rid, self.loaded.model_id, choices, use, parsed.echo,
                               parsed.n, parsed.logprobs is not None, parsed.tools)
        self.log.write("response", body)
        return body

    async def collect(self, request: Request, parsed: Parsed, pending: "Pending") -> list[shapes.ChoiceState]:
        """Every choice to its end; a client gone meanwhile cancels them."""
        choices = [shapes.ChoiceState() for _ in parsed.params]
        checked = time.monotonic()
        while True:
            try:
                item = await pending.next(timeout=0.5)
            except asyncio.TimeoutError:
                item = ...
            if time.monotonic() - checked >= 0.5:  # tokens may arrive without pause: look anyway
                checked = time.monotonic()
                if await request.is_disconnected():
                    pending.abort()
                    return choices
            if item is ...:
                continue
            if item is None:
                return choices
            j, out = item
            if out.finish_reason in ("error", "cancelled"):
                pending.abort()
                raise failure(out, parsed)
            choices[j].add(out, shapes.logprob_entry(out, self.tt))

    async def stream(self, parsed: Parsed, rid: str, pending: "Pending") -> AsyncIterator[str]:
        """SSE: a first chunk per choice, one chunk per token, a finish chunk per choice, usage
        if asked, [DONE]. A client that hangs up cancels what is still running (finally)."""
        ev = _Events(parsed, rid, self.loaded.model_id)
        choices = [shapes.ChoiceState() for _ in parsed.params]
        try:
            for j in range(len(choices)):
                if opening := from_opening(ev, j):
                    yield opening
            while (item := await pending.next()) is not None:
                j, out = item
                if out.finish_reason in ("error", "cancelled"):  # a bug, or the server stopping
                    yield ev.sse(failure(out, parsed).body())
                    break
                entry = shapes.logprob_entry(out, self.tt)
                choices[j].add(out, entry)
                for event in ev.token(j, out, entry):
                    yield event
            if parsed.include_usage:
                yield ev.sse(shapes.usage_chunk(parsed.kind, rid, ev.model,
                                                shapes.usage(sum(map(len, parsed.prompts)), choices)))
            yield "data: [DONE]\n\n"
            self.log.write("response", {"id": rid, "choices": [c.text for c in choices],
                                        "finish_reasons": [c.finish for c in choices]})
        finally:
            pending.abort()


class _Events:
    """SSE events of one streamed request."""

    def __init__(self, parsed: Parsed, rid: str, model: str):
        self.p, self.rid, self.model = parsed, rid, model
        self.lp = parsed.logprobs is not None
        self.offsets = [len(parsed.echo[j // parsed.n]) if parsed.echo else 0 for j in range(len(parsed.params))]
        # tools: each choice's text split into content and tool_calls deltas as it streams
        self.tools = [DeltaStream(parsed.tools) for _ in parsed.params] if parsed.tools else None

    @staticmethod
    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(self, j: int, text: str | None, finish: str | None = None, entry=None, role: bool = False,
              delta: dict | None = None) -> str:
        return self.sse(shapes.chunk(self.p.kind, self.rid, self.model, j, text, finish, entry, self.lp,
                                     role=role, include_usage=self.p.include_usage, offset=self.offsets[j],
                                     delta=delta))

    def tool_token(self, j: int, out, entry) -> list[str]:
        """With tools: content and tool_calls deltas (markup held back), then the finish reason
        ("tool_calls" when the answer called tools)."""
        stream = self.tools[j]
        deltas = stream.feed(out.text) + (stream.finish() if out.finish_reason is not None else [])
        events = [self.chunk(j, None, entry=entry if k == 0 else None, delta=d) for k, d in enumerate(deltas)]
        if not deltas and entry is not None:
            events.append(self.chunk(j, None, entry=entry))
        if out.finish_reason is not None:
            events.append(self.chunk(j, None, stream.finish_reason(out.finish_reason)))
        return events

    def token(self, j: int, out, entry) -> list[str]:
        if self.tools is not None:
            return self.tool_token(j, out, entry)
        events = []
        if out.text or entry is not None:
            events.append(self.chunk(j, out.text, entry=entry))
            self.offsets[j] += len(out.text)
        if out.finish_reason is not None:
            events.append(self.chunk(j, None if self.p.kind == "chat" else "", out.finish_reason))
        return events


def failure(out, parsed: Parsed) -> ApiError:
    """A request the engine ended without an answer: the client's mistake (400), the engine gone
    or going (503), or a bug that failed this request alone (500)."""
    if out.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down; retry later.", type_="server_error")
    if isinstance(out.error, UserError):
        return ApiError(400, out.text, _param_of(out.error, parsed))
    if isinstance(out.error, EngineFailed):
        return ApiError(503, out.text, type_="server_error", code="engine_failed")
    return ApiError(500, out.text, type_="server_error")


def _param_of(err: UserError, parsed: Parsed) -> str:
    """The field a UserError from the engine is about: its own (a ParamError's), else the prompt."""
    return getattr(err, "field", None) or ("messages" if parsed.kind == "chat" else "prompt")


def from_opening(ev: _Events, j: int) -> str:
    """Chat streams open each choice with the assistant role; completions echo the prompt."""
    if ev.p.kind == "chat":
        return ev.chunk(j, "", role=True)
    return ev.chunk(j, ev.p.echo[j // ev.p.n]) if ev.p.echo else ""


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mistralrs-cli", docs_url=None, redoc_url=None, openapi_url=None)
    r = Routes(state)
    app.add_exception_handler(StarletteHTTPException, r.http_error)
    app.add_exception_handler(ApiError, r.api_error)
    app.add_exception_handler(Exception, r.internal)
    app.get("/health")(r.health)
    app.get("/v1/models")(r.models)
    app.post("/v1/chat/completions")(r.chat)
    app.post("/v1/completions")(r.completions)
    app.post("/v1/re_isq")(r.reisq)
    app.post("/re_isq")(r.reisq)
    app.post("/activate_adapters")(r.activate_adapters)  # mistral.rs's path
    app.post("/v1/activate_adapters")(r.activate_adapters)
    return app


class Mailbox:
    """Outputs from the engine thread to one event loop's queues, in one wake-up of the loop per
    batch: a decode step of 16 streams hands over 16 outputs with one call_soon_threadsafe (a
    lock and a write to the loop's wake-up socket each) instead of 16."""

    _by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Mailbox":
        box = cls._by_loop.get(loop)
        if box is None:
            box = cls._by_loop[loop] = cls(loop)
        return box

    def post(self, q: asyncio.Queue, item) -> None:  # engine thread
        with self.lock:
            self.items.append((q, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody reads these any more
            with self.lock:
                self.items, self.scheduled = [], False
            raise

    def _drain(self) -> None:  # event loop
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for q, item in items:
            q.put_nowait(item)


class Pending:
    """The choices of one HTTP request in the engine: their outputs arrive on an asyncio queue."""

    def __init__(self, worker: EngineThread, parsed: Parsed):
        box = Mailbox.of(asyncio.get_running_loop())
        self.worker, self.q = worker, asyncio.Queue()
        self.rids: list[str] = []
        self.open: set[int] = set()
        try:
            for j, params in enumerate(parsed.params):
                ids = parsed.prompts[j // parsed.n]
                sink = (lambda out, j=j: box.post(self.q, (j, out)))
                images = parsed.images[j // parsed.n] if parsed.images else None
                self.rids.append(worker.submit(ids, params, sink, images=images))
                self.open.add(j)
        except (UserError, QueueFull, EngineFailed) as e:
            self.abort()
            if isinstance(e, EngineFailed):
                raise ApiError(503, f"{e}; the server is stopping.", type_="server_error",
                               code="engine_failed") from None
            if isinstance(e, QueueFull):
                raise ApiError(503, f"the server is busy ({e}); retry later.", type_="server_error") from None
            code = "context_length_exceeded" if "context" in str(e) or "KV cache" in str(e) else None
            raise ApiError(400, str(e), _param_of(e, parsed), code) from None

    async def next(self, timeout: float | None = None):
        """(choice, output), or None when every choice has finished; TimeoutError on timeout."""
        if not self.open:
            return None
        j, out = await asyncio.wait_for(self.q.get(), timeout)
        if out.finish_reason is not None:
            self.open.discard(j)
        return j, out

    def abort(self) -> None:
        for j in list(self.open):
            self.worker.abort(self.rids[j])
        self.open.clear()
