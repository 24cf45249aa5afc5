"""`mistralrs-bench`: prompt processing ("pp N") and text generation ("tg N") speed of one loaded
model on the engine, per concurrency level, as mistral.rs's mistralrs-bench reports it.

pp N: c requests of N random prompt tokens each, one token generated; t/s = the request's prompt
tokens / its prompt time. tg N: c requests of a one-token prompt generating N tokens with EOS
ignored; t/s = (tokens generated - 1) / the request's decode time. Both with the prefix cache off
(random prompts would not hit it anyway, and a repetition must not reuse the last one's blocks).
throughput/s is the tokens all requests processed (generated, for tg: fewer than N when the
context ends first) over the wall time of the round. Mean ± standard deviation over
repetitions x requests. Peak RSS is the process's high-water mark.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..types import EngineConfig, LoadOptions, SamplingParams


@dataclass
class BenchOptions:
    n_prompt: int = 512
    n_gen: int = 128
    concurrency: list[int] = field(default_factory=lambda: [1])
    repetitions: int = 5
    json_path: str | None = None

    def check(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or (self.n_prompt == 0 and self.n_gen == 0):
            raise UserError("-p/--n-prompt and -g/--n-gen must be 0 or more, and not both 0.")
        if not self.concurrency or min(self.concurrency) < 1:
            raise UserError("-c/--concurrency takes positive integers, e.g. -c 1,2,4.")
        if self.repetitions < 1:
            raise UserError(f"-r/--repetitions must be 1 or more, got {self.repetitions}.")


@dataclass
class BenchRun:
    """What `mistralrs-bench`'s options hand to a subcommand (in place of mistralrs's RunOptions)."""

    bench: BenchOptions
    load: LoadOptions


@dataclass
class BenchRow:
    model: str
    backend: str
    test: str
    concurrency: int
    tps_mean: float  # per request, tokens per second
    tps_std: float
    ms_per_token: float
    throughput: float  # all requests' tokens per wall-clock second
    ttft_ms: float  # pp: mean time from scheduling to the first token


def parse_concurrency(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"-c/--concurrency takes a comma-separated list of integers, got {text!r}.") from None


def _round(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, float]:
    """Run the requests together to the end: (final outputs, wall seconds)."""
    t0 = time.perf_counter()
    reqs = {engine.add_request(p, params).id for p in prompts}
    finals = {}
    while len(finals) < len(reqs):
        for out in engine.step():
            if out.request_id in reqs and out.finish_reason is not None:
                finals[out.request_id] = out
    return list(finals.values()), time.perf_counter() - t0


def _prompts(vocab: int, special: set[int], n: int, count: int, gen) -> list[list[int]]:
    ids = [i for i in range(vocab) if i not in special][: max(vocab // 2, 1)]
    return [[ids[j] for j in gen.integers(len(ids), size=n)] for _ in range(count)]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_tests(loaded, opts: BenchOptions, backend: str = "cpu") -> list[BenchRow]:
    import numpy as np

    from ..engine.engine import Engine

    opts.check()
    engine = Engine(loaded, EngineConfig(max_seqs=max(opts.concurrency), prefix_cache_n=0))
    vocab = loaded.config.vocab_size
    special = set(loaded.eos_ids) | {loaded.tokenizer.bos_id}
    gen = np.random.default_rng(0)
    rows = []
    tests = ([("pp", opts.n_prompt)] if opts.n_prompt else []) + ([("tg", opts.n_gen)] if opts.n_gen else [])
    _round(engine, _prompts(vocab, special, 8, 1, gen), SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    for c in opts.concurrency:
        for test, n in tests:
            tps, ttft, thr = [], [], []
            for _ in range(opts.repetitions):
                prompt_len, max_tokens = (n, 1) if test == "pp" else (1, n)
                outs, wall = _round(engine, _prompts(vocab, special, prompt_len, c, gen),
                                    SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for o in outs:  # the tokens each request really processed, not the ones asked for
                    if test == "pp":
                        tps.append(o.prompt_tokens / max(o.prompt_time, 1e-9))
                        ttft.append(o.prompt_time * 1e3)
                    else:
                        tps.append((o.completion_tokens - 1) / max(o.decode_time, 1e-9))
                done = sum(o.prompt_tokens if test == "pp" else o.completion_tokens for o in outs)
                thr.append(done / wall)
            mean, std = _stats(tps)
            rows.append(BenchRow(loaded.model_id, backend, f"{test} {n}", c, mean, std, 1e3 / mean,
                                 statistics.fmean(thr), statistics.fmean(ttft) if ttft else float("nan")))
    spec = engine.spec
    if spec is not None and spec.runs:  # speculative decoding: how much of the drafts the target kept
        print(f"speculative: {spec.accepted}/{spec.proposed} draft tokens accepted ({spec.acceptance_rate:.0%}), "
              f"{spec.mean_accepted_length:.2f} tokens per verify", file=sys.stderr)
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def render(rows: list[BenchRow]) -> str:
    head = "| model | backend | test | t/s | ms/t | concurrency | throughput/s | TTFT ms |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = f"{r.ttft_ms:.1f}" if r.ttft_ms == r.ttft_ms else "-"
        lines.append(f"| {r.model} | {r.backend} | {r.test} | {r.tps_mean:.2f}±{r.tps_std:.2f} | "
                     f"{r.ms_per_token:.2f} | {r.concurrency} | {r.throughput:.2f} | {ttft} |")
    return "\n".join(lines)


def run_bench(run: BenchRun, spec) -> None:
    from ..backends.native import threads
    from ..loaders.load import load

    opts, load_opts = run.bench, run.load
    opts.check()
    t0 = time.perf_counter()
    loaded = load(spec, load_opts)
    load_s = time.perf_counter() - t0
    rows = run_tests(loaded, opts, load_opts.device if load_opts.device != "auto" else "cpu")
    print(render(rows))
    rss = peak_rss_mb()
    print(f"load {load_s:.2f} s, peak RSS {rss:.0f} MB, {threads()} threads", file=sys.stderr)
    if opts.json_path:
        doc = {"rows": [asdict(r) for r in rows], "load_s": load_s, "peak_rss_mb": rss,
               "threads": threads(), "options": asdict(opts)}
        with open(opts.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
