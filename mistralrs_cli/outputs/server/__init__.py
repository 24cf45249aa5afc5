"""--port (or no output mode at all): the OpenAI-compatible HTTP server. The only package that
imports FastAPI and uvicorn."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

from ...types import EngineConfig, GGMLSpec, GGUFSpec
from .protocol import ApiError

GRACE_SECONDS = 10  # SIGINT/SIGTERM: in-flight requests get this long to finish, then are cancelled
# the engine thread failed: its requests have their errors; /health says 503 for this long (so a
# supervisor polling it sees why), then the server stops and the process exits with status 1
FAILED_GRACE_SECONDS = 2


def reisq_handler(spec: Any, worker, numerics: str = "precise") -> Callable[[str], str]:
    """POST /v1/re_isq: quantize a plain model's linear layers in place; refuse GGUF/GGML files
    (quantized already)."""
    if isinstance(spec, (GGUFSpec, GGMLSpec)):
        fmt = "GGUF" if isinstance(spec, GGUFSpec) else "GGML"

        def refuse(kind: str) -> str:
            raise ApiError(400, f"re_isq cannot requantize a {fmt} model (its weights are quantized "
                                "already); ISQ applies to plain safetensors models.", "ggml_type")
        return refuse
    from ...errors import UserError

    def requantize(kind: str) -> str:
        try:  # on the engine thread, between steps
            worker.call(lambda engine: _requantize(engine, kind, numerics))
        except UserError as e:
            raise ApiError(400, f"re_isq: {e}", "ggml_type") from None
        return f"the model is now quantized to {kind}"
    return requantize


def _requantize(engine, kind: str, numerics: str) -> None:
    from ...quant.isq import isq_model

    isq_model(engine.model, kind, numerics, progress=False)
    if engine.kv is not None:
        engine.kv.alloc.forget()


def run_server(opts: Any, spec: Any, config: EngineConfig) -> None:
    import uvicorn

    from ...engine.engine import Engine
    from ...engine.worker import EngineThread
    from ...loaders.load import load
    from ..request_log import RequestLog
    from .app import ServerState, make_app

    log = RequestLog(opts.request_log)
    loaded = load(spec, opts.load)
    worker = EngineThread(Engine(loaded, config))
    state = ServerState(worker, loaded, opts.api_key, log, reisq_handler(spec, worker, opts.load.numerics),
                        opts.limits)
    app = make_app(state)
    level = "warning" if opts.quiet else "info"
    host = f"[{opts.host}]" if ":" in opts.host else opts.host

    class Server(uvicorn.Server):
        """On SIGINT/SIGTERM uvicorn stops accepting and waits for open responses; after the
        grace period the engine cancels what still runs, so every stream ends cleanly."""
        timer: threading.Timer | None = None

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and not opts.quiet:
                print(f"serving {loaded.model_id} at http://{host}:{opts.port}/v1 (OpenAI API); "
                      "Ctrl-C stops", file=sys.stderr, flush=True)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if self.timer is None:
                self.timer = threading.Timer(GRACE_SECONDS, worker.cancel_all)
                self.timer.daemon = True
                self.timer.start()

    server = Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level=level,
                                   timeout_graceful_shutdown=GRACE_SECONDS + 5, access_log=opts.verbose))

    def engine_failed(reason: str) -> None:  # on the engine thread, after its requests got errors
        timer = threading.Timer(FAILED_GRACE_SECONDS, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    worker.on_failure = engine_failed
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler turns that
    # into a clean exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when it cannot bind
        pass
    finally:
        worker.stop(timeout=GRACE_SECONDS)
    if worker.failure is not None:  # a bug, with its traceback logged above: not a UserError
        print(f"error: the engine failed ({worker.failure}); the server stopped.", file=sys.stderr,
              flush=True)
        sys.exit(1)
    if not server.started:
        from ...errors import UserError
        raise UserError(f"could not listen on {opts.host}:{opts.port} (in use, or not an address "
                        "of this machine); choose another --port or --host.")
