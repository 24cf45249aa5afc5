"""load(spec) -> Engine -> the chosen output mode. Validation of global options lives here."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import validation
from .errors import UserError
from .numerics import check_numerics
from .types import EngineConfig, LoadOptions
from .validation import Limits

LOG_LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
              "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
              "trace": logging.DEBUG}


@dataclass
class RunOptions:
    prompt: str | None = None
    interactive: bool = False
    raw: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: dict[str, Any] = field(default_factory=dict)
    truncate_sequence: bool = False
    log: str | None = None
    request_logging_file: str | None = None
    verbose: bool = False
    quiet: bool = False
    # the server (--port, or no output mode at all)
    port: int | None = None
    host: str = "127.0.0.1"
    api_key: str | None = None
    # the engine
    max_seqs: int = 16
    no_kv_cache: bool = False
    no_paged_attn: bool = False
    pa_blk_size: int = 32
    pa_gpu_mem: float | None = None
    pa_gpu_mem_usage: float | None = None
    pa_ctxt_len: int | None = None
    prefix_cache_n: int = 16
    limits: Limits = field(default_factory=Limits)  # what one request may ask for (--max-n, ...)
    images: list[str] = field(default_factory=list)  # --image: for --prompt, with a vision model
    # --grammar-regex RE, --grammar-lark FILE, --json-schema FILE, --json (None: not given)
    grammar_flags: dict[str, Any] = field(default_factory=dict)

    @property
    def request_log(self) -> str | None:
        if self.request_logging_file:
            return self.request_logging_file
        return None if self.log is None or self.log.lower() in LOG_LEVELS else self.log


DEFAULT_PORT = 1234  # no output mode: the server, on the later guide's port


def engine_config(opts: RunOptions) -> EngineConfig:
    """The engine settings of every output mode, with the flags checked (validation.ENGINE_RULES)."""
    given = validation.check_engine(dict(
        max_seqs=opts.max_seqs, block_size=opts.pa_blk_size, kv_mem_mb=opts.pa_gpu_mem,
        kv_mem_fraction=opts.pa_gpu_mem_usage, kv_tokens=opts.pa_ctxt_len, prefix_cache_n=opts.prefix_cache_n))
    return EngineConfig(truncate_sequence=opts.truncate_sequence, no_kv_cache=opts.no_kv_cache,
                        paged_attn=not opts.no_paged_attn, **given)


def sampling_flags(opts: RunOptions) -> dict[str, Any]:
    """The sampling flags given, checked by the rules the server and the Python API use
    (validation.py); the model's defaults fill the rest once it is loaded
    (sampling_defaults.sampling_params)."""
    s = validation.check_sampling(opts.sampling, validation.flag, limits=opts.limits)
    if s.get("top_k") == -1:
        s["top_k"] = 0  # -1 and 0: no top-k
    return s


def read_prompt(prompt: str) -> str:
    """--prompt TEXT, or stdin for '-', as UTF-8 text (anything else is one clear error)."""
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt - read bytes from stdin that are not UTF-8 (byte {data[e.start]:#04x} at "
                            f"offset {e.start}); send UTF-8 text.") from None
    return validation.check_text(prompt, "--prompt")


def grammar_flag(flags: dict[str, Any], modes: list[str]):
    """The one grammar flag given, read and checked for syntax before the model loads (its
    vocabulary check comes with the first request); None without one."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} are different grammars; give one.")
    (name, value), = given.items()
    if not any(m in ("--prompt", "-i/--interactive") for m in modes):
        raise UserError(f"{name} goes with --prompt or -i; the server takes the grammar or response_format "
                        "field in each request.")
    from .grammar import json_object, syntax_check
    from .types import Grammar

    if name == "--json":
        return json_object()
    if name == "--grammar-regex":
        g = Grammar("regex", value)
    else:
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{name} {value}: cannot read the file ({e}); give a readable UTF-8 file.") from None
        g = Grammar("lark" if name == "--grammar-lark" else "json_schema", text)
    syntax_check(g, f"{name} {value}")
    return g


def _setup_logging(opts: RunOptions) -> None:
    level = logging.WARNING
    if opts.log and opts.log.lower() in LOG_LEVELS:
        level = LOG_LEVELS[opts.log.lower()]
    if opts.verbose:
        level = logging.DEBUG
    if opts.quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _check_device(device: str) -> None:
    """--device auto|cpu|cuda[:N] must name one of those (which one serves is settled at load)."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise UserError(f"--device {device!r} is not one of auto, cpu, cuda (or cuda:N).")


def run(opts: RunOptions, spec: Any) -> None:
    _setup_logging(opts)
    modes = [name for name, on in (("--prompt", opts.prompt is not None), ("-i/--interactive", opts.interactive),
                                   ("--port", opts.port is not None)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are different output modes; choose one.")
    if opts.load.dtype not in ("auto", "f32", "bf16", "f16"):
        raise UserError(f"--dtype {opts.load.dtype!r} is not one of auto, f32, bf16, f16.")
    check_numerics(opts.load.numerics)
    _check_device(opts.load.device)
    if opts.load.tp != 1:  # before anything starts (distributed/launch.py)
        from .distributed.launch import check

        check(opts.load, spec)
    if opts.images and opts.prompt is None:
        raise UserError("--image goes with --prompt; in -i type \\image PATH_OR_URL text, and the server "
                        "takes image_url parts.")
    opts.limits.check()
    config = engine_config(opts)
    params = sampling_flags(opts)
    # a cached SentencePiece vocabulary loads on a thread while the output mode's imports run
    from .loaders.tokenizer_cache import prefetch_gguf_tokenizer

    prefetch_gguf_tokenizer(spec, opts.load)
    grammar = grammar_flag(opts.grammar_flags, modes)
    if grammar is not None:
        params["grammar"] = grammar
    if not modes or opts.port is not None:
        from .outputs.server import run_server

        if opts.port is None:
            opts.port = DEFAULT_PORT
        if not 0 <= opts.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {opts.port}.")
        run_server(opts, spec, config)
    elif opts.prompt is not None:
        from .outputs.oneshot import run_oneshot

        prompt = read_prompt(opts.prompt)
        run_oneshot(opts, spec, prompt, params, config)
    else:
        from .outputs.interactive import run_interactive

        run_interactive(opts, spec, params, config)
