"""The OpenAI-compatible routes (FastAPI). Requests go to the engine thread; each choice's
deltas come back through an asyncio queue and leave as JSON or as SSE chunks (one per token)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine.token_text import TokenText
from ...engine.worker import EngineThread, QueueFull
from ...errors import UserError
from ..request_log import RequestLog
from . import shapes
from .protocol import ApiError, Parsed, parse_chat, parse_completion


@dataclass
class ServerState:
    worker: EngineThread
    loaded: Any
    api_key: str | None = None
    log: RequestLog | None = None
    reisq: Callable[[str], str] | None = None  # ISQ type -> message; raises ApiError


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mistralrs-cli", docs_url=None, redoc_url=None, openapi_url=None)
    tt = TokenText(state.loaded.tokenizer)
    log = state.log or RequestLog(None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "unknown_url" if exc.status_code == 404 else None
        msg = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
               else str(exc.detail))
        return error_response(ApiError(exc.status_code, msg, code=code))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        log.write("error", {"path": request.url.path, "status": exc.status, "message": exc.message})
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.write("error", {"path": request.url.path, "status": 500, "message": repr(exc)})
        return error_response(ApiError(500, f"internal error: {exc}", type_="server_error"))

    async def body_of(request: Request) -> dict:
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        log.write("request", {"path": request.url.path, "body": body})
        return body

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise ApiError(401, "Incorrect or missing API key: send the header "
                                "'Authorization: Bearer <key>' with the key given to --api-key.",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": state.loaded.model_id, "object": "model",
                                            "created": int(time.time()), "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parsed = parse_chat(await body_of(request), state.loaded)
        return await complete(request, parsed)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await body_of(request), state.loaded)
        return await complete(request, parsed)

    async def reisq(request: Request):
        body = await body_of(request)
        kind = body.get("ggml_type") or body.get("isq_type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(400, "send the quantization type as ggml_type or isq_type, e.g. "
                                '{"ggml_type": "Q4K"}.', "ggml_type")
        if state.reisq is None:
            raise ApiError(400, "in-situ quantization is not available in this build.", "ggml_type")
        return {"message": await asyncio.to_thread(state.reisq, kind)}

    app.post("/v1/re_isq")(reisq)
    app.post("/re_isq")(reisq)

    async def complete(request: Request, parsed: Parsed):
        rid = shapes.new_id(parsed.kind)
        pending = Pending(state.worker, parsed)
        if parsed.stream:
            gen = stream(parsed, rid, pending)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = await collect(request, parsed, pending)
        use = shapes.usage(sum(map(len, parsed.prompts)), choices)
        body = shapes.response(parsed.kind, rid, state.loaded.model_id, choices, use, parsed.echo,
                               parsed.n, parsed.logprobs is not None)
        log.write("response", body)
        return body

    async def collect(request: Request, parsed: Parsed, pending: Pending) -> list[shapes.ChoiceState]:
        choices = [shapes.ChoiceState() for _ in parsed.params]
        while True:
            try:
                item = await pending.next(timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    pending.abort()
                    return choices
                continue
            if item is None:
                return choices
            j, out = item
            if out.finish_reason == "error":
                pending.abort()
                raise ApiError(500, out.text, type_="server_error")
            if out.finish_reason == "cancelled":
                pending.abort()
                raise ApiError(503, "the server is shutting down; retry later.", type_="server_error")
            choices[j].add(out, shapes.logprob_entry(out, tt))

    async def stream(parsed: Parsed, rid: str, pending: Pending) -> AsyncIterator[str]:
        model, kind, lp = state.loaded.model_id, parsed.kind, parsed.logprobs is not None
        inc = parsed.include_usage
        choices = [shapes.ChoiceState() for _ in parsed.params]
        offsets = [len(parsed.echo[j // parsed.n]) if parsed.echo else 0 for j in range(len(choices))]

        def sse(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            for j in range(len(choices)):
                if kind == "chat":
                    yield sse(shapes.chunk(kind, rid, model, j, "", None, None, lp, role=True, include_usage=inc))
                elif parsed.echo:
                    yield sse(shapes.chunk(kind, rid, model, j, parsed.echo[j // parsed.n], None, None, lp,
                                           include_usage=inc))
            while (item := await pending.next()) is not None:
                j, out = item
                if out.finish_reason in ("error", "cancelled"):  # a bug, or the server stopping
                    msg = out.text if out.finish_reason == "error" else "the server is shutting down"
                    yield sse(ApiError(500 if out.finish_reason == "error" else 503, msg,
                                       type_="server_error").body())
                    break
                entry = shapes.logprob_entry(out, tt)
                choices[j].add(out, entry)
                if out.text or entry is not None:
                    yield sse(shapes.chunk(kind, rid, model, j, out.text, None, entry, lp,
                                           include_usage=inc, offset=offsets[j]))
                    offsets[j] += len(out.text)
                if out.finish_reason is not None:
                    text = None if kind == "chat" else ""
                    yield sse(shapes.chunk(kind, rid, model, j, text, out.finish_reason, None, lp,
                                           include_usage=inc))
            if inc:
                use = shapes.usage(sum(map(len, parsed.prompts)), choices)
                yield sse(shapes.usage_chunk(kind, rid, model, use))
            yield "data: [DONE]\n\n"
            log.write("response", {"id": rid, "choices": [c.text for c in choices],
                                   "finish_reasons": [c.finish for c in choices]})
        finally:
            pending.abort()  # a client that hung up: cancel what is still running

    return app


class Pending:
    """The choices of one HTTP request in the engine: their outputs arrive on an asyncio queue."""

    def __init__(self, worker: EngineThread, parsed: Parsed):
        loop = asyncio.get_running_loop()
        self.worker, self.q = worker, asyncio.Queue()
        self.rids: list[str] = []
        self.open: set[int] = set()
        try:
            for j, params in enumerate(parsed.params):
                ids = parsed.prompts[j // parsed.n]
                sink = (lambda out, j=j: loop.call_soon_threadsafe(self.q.put_nowait, (j, out)))
                self.rids.append(worker.submit(ids, params, sink))
                self.open.add(j)
        except (UserError, QueueFull) as e:
            self.abort()
            if isinstance(e, QueueFull):
                raise ApiError(503, f"the server is busy ({e}); retry later.", type_="server_error") from None
            code = "context_length_exceeded" if "context" in str(e) or "KV cache" in str(e) else None
            raise ApiError(400, str(e), "messages" if parsed.kind == "chat" else "prompt", code) from None

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
