"""load(spec) -> Engine -> the chosen output mode. Validation of global options lives here."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .types import LoadOptions, SamplingParams

LOG_LEVELS = {"off": logging.CRITICAL + 10, "error": logging.ERROR, "warn": logging.WARNING,
              "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
              "trace": logging.DEBUG}
# -i defaults, as mistral.rs's interactive mode samples
INTERACTIVE_DEFAULTS = {"temperature": 0.1, "top_k": 32, "top_p": 0.1}


@dataclass
class RunOptions:
    prompt: str | None = None
    interactive: bool = False
    raw: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: dict[str, Any] = field(default_factory=dict)
    truncate_sequence: bool = False
    log: str | None = None
    verbose: bool = False
    quiet: bool = False

    @property
    def request_log(self) -> str | None:
        return None if self.log is None or self.log.lower() in LOG_LEVELS else self.log


def sampling_params(opts: RunOptions, interactive: bool) -> SamplingParams:
    s = {k: v for k, v in opts.sampling.items() if v is not None}
    if s.get("max_tokens", 0) < 0:
        raise UserError(f"--max-tokens must be 0 or more, got {s['max_tokens']}.")
    if s.get("temperature", 0.0) < 0:
        raise UserError(f"--temperature must be 0 or more, got {s['temperature']}.")
    if not 0.0 <= s.get("top_p", 1.0) <= 1.0:
        raise UserError(f"--top-p must be between 0 and 1, got {s['top_p']}.")
    if s.get("top_k", 1) < 0:
        raise UserError(f"--top-k must be 0 or more, got {s['top_k']}.")
    if interactive and "temperature" not in s:
        s = {**INTERACTIVE_DEFAULTS, **s}
    return SamplingParams(**s)


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
    if device in ("auto", "cpu"):
        return
    if device == "cuda" or device.startswith("cuda:"):
        raise UserError(f"--device {device}: this build has no CUDA backend yet; use --device cpu "
                        "(or auto).")
    raise UserError(f"--device {device!r} is not one of auto, cpu.")


def run(opts: RunOptions, spec: Any) -> None:
    _setup_logging(opts)
    if opts.prompt is not None and opts.interactive:
        raise UserError("--prompt and -i/--interactive are two output modes; choose one.")
    if opts.prompt is None and not opts.interactive:
        raise UserError("choose an output mode: --prompt TEXT for a one-shot answer or -i for a chat "
                        "(global options go before the subcommand).")
    if opts.load.dtype not in ("auto", "f32", "bf16", "f16"):
        raise UserError(f"--dtype {opts.load.dtype!r} is not one of auto, f32, bf16, f16.")
    _check_device(opts.load.device)
    params = sampling_params(opts, opts.interactive)
    if opts.prompt is not None:
        from .outputs.oneshot import run_oneshot

        prompt = sys.stdin.read() if opts.prompt == "-" else opts.prompt
        run_oneshot(opts, spec, prompt, params)
    else:
        from .outputs.interactive import run_interactive

        run_interactive(opts, spec, params)
