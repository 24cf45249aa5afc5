"""--prompt: stream the completion to stdout, stats to stderr, exit 0. The shell-script mode."""
from __future__ import annotations

import sys
import time

from ..api import Runner
from ..prompting import chat_ids, completion_ids
from ..sampling_defaults import sampling_params
from ..types import EngineConfig, SamplingParams
from .request_log import RequestLog


def stats_line(n_prompt: int, prompt_time: float, n_gen: int, decode_time: float) -> str:
    pps = n_prompt / prompt_time if prompt_time > 0 else 0.0
    # the first token comes out of the prefill step, so decode speed counts the others
    dps = (n_gen - 1) / decode_time if decode_time > 0 and n_gen > 1 else 0.0
    return (f"prompt: {n_prompt} tokens, {pps:.1f} tok/s | generated: {n_gen} tokens, "
            f"{dps:.1f} tok/s")


def length_notice(params: SamplingParams, completion_tokens: int, max_context: int) -> str:
    """One stderr line for an answer cut short (finish reason "length"), saying by what."""
    if params.max_tokens is not None and completion_tokens >= params.max_tokens:
        return (f"[stopped after --max-tokens {params.max_tokens} tokens, before an end token "
                f"(finish reason \"length\")]")
    return (f"[stopped at the context limit of {max_context} tokens, before an end token "
            f"(finish reason \"length\")]")


def run_oneshot(opts, spec, prompt: str, flags: dict, config: EngineConfig | None = None) -> None:
    """flags: the sampling flags given (run.sampling_flags); the model's defaults fill the rest."""
    t0 = time.perf_counter()
    log = RequestLog(opts.request_log)
    runner = Runner(spec, token_source=opts.load.token_source, chat_template=opts.load.chat_template,
                    truncate_sequence=opts.truncate_sequence, loaded=_load(opts, spec), engine_config=config,
                    _flag_names=True)
    loaded = runner.loaded
    params = sampling_params(flags, loaded.generation_config)
    images = None
    if opts.images or loaded.vision is not None:
        from ..vision.chat import cli_prompt

        ids, images = cli_prompt(loaded, prompt, opts.images, opts.raw)
    else:
        ids = completion_ids(loaded, prompt) if opts.raw else chat_ids(loaded, [{"role": "user", "content": prompt}])
    log.write("request", {"prompt": prompt, "raw": opts.raw, "prompt_tokens": len(ids)})
    text, last, ttft = [], None, None
    for out in runner.stream(ids, params, images=images):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
            text.append(out.text)
        last = out
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.write("response", {"text": "".join(text), "finish_reason": last.finish_reason if last else None})
    if last is not None and last.finish_reason == "length" and not opts.quiet:
        print(length_notice(params, last.completion_tokens, loaded.max_context), file=sys.stderr)
    if last is not None and not opts.quiet:
        print(stats_line(last.prompt_tokens, last.prompt_time, last.completion_tokens, last.decode_time)
              + f" | first token after {ttft:.2f} s" + spec_stats(last), file=sys.stderr)


def spec_stats(out) -> str:
    """Speculative decoding's share of the stats line ("" without it): the request's draft
    tokens accepted, and tokens emitted per verifying forward pass."""
    if not out.speculative:
        return ""
    proposed, accepted, runs = out.speculative
    rate = accepted / proposed if proposed else 0.0
    return (f" | speculative: {accepted}/{proposed} draft tokens accepted "
            f"({rate:.0%}), {(accepted + runs) / runs:.2f} tokens per verify")


def _load(opts, spec):
    from ..loaders.load import load

    return load(spec, opts.load)
