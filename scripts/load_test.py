"""Load test of an OpenAI-compatible server with the official `openai` client.

For each concurrency level (default 1, 4, 16) C clients each send R streaming chat requests;
reports aggregate decode throughput (completion tokens / wall time), TTFT p50/p99, the
per-stream decode rate and the client's own CPU time per token (it shares the machine). Each
request starts with its own number so no two prompts share a prefix (no prefix-cache help), and
EOS is suppressed with logit_bias so every request generates exactly --max-tokens tokens on any
server.

    # against a running server
    python scripts/load_test.py --base-url http://127.0.0.1:1234/v1
    # start ours and llama.cpp's (llama-cpp-python) on the same GGUF, same threads, one run
    python scripts/load_test.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --llama-cpp --threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import openai

WORDS = ("Tell me a long story about a lighthouse keeper who finds a message in a bottle, "
         "with many details about the sea, the weather and the people of the village.")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class _Tally:
    """One streamed request as it arrives: time to first content, tokens (usage when sent)."""

    def __init__(self):
        self.t0, self.ttft, self.tokens, self.usage = time.perf_counter(), None, 0, None

    def add(self, chunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            self.tokens += 1  # one chunk per token (a fallback when a server sends no usage)
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.t0

    def result(self) -> dict:
        end, ttft = time.perf_counter(), self.ttft
        n_tok = self.usage if self.usage is not None else self.tokens
        span = end - self.t0 - ttft if ttft is not None else 0.0
        decode = (n_tok - 1) / span if ttft is not None and n_tok > 1 and span > 0 else 0.0
        return {"ttft": ttft or float("nan"), "tokens": n_tok, "decode_tps": decode}


def _request(args, n: int) -> dict:
    return dict(model=args.model, messages=[{"role": "user", "content": f"Request {n}. {WORDS}"}],
                max_tokens=args.max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, logit_bias={str(args.eos_id): -100})


def one_request(client: openai.OpenAI, args, n: int) -> dict:
    tally = _Tally()
    for chunk in client.chat.completions.create(**_request(args, n)):
        tally.add(chunk)
    return tally.result()


async def one_request_async(client: "openai.AsyncOpenAI", args, n: int) -> dict:
    tally = _Tally()
    async for chunk in await client.chat.completions.create(**_request(args, n)):
        tally.add(chunk)
    return tally.result()


def _clients_async(base_url: str, args, concurrency: int) -> tuple[list[dict], float]:
    """The C clients as asyncio tasks on one thread (AsyncOpenAI). (results, wall seconds)"""
    async def main() -> tuple[list[dict], float]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=args.api_key or "none", max_retries=0, timeout=3600)
        await one_request_async(client, args, -1)  # warm-up

        async def client_loop(c: int) -> list[dict]:
            return [await one_request_async(client, args, c * args.requests + r) for r in range(args.requests)]

        t0 = time.perf_counter()
        groups = await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
        await client.close()
        return [x for xs in groups for x in xs], wall

    return asyncio.run(main())


def _clients_threads(base_url: str, args, concurrency: int) -> tuple[list[dict], float]:
    """The C clients as threads, each with the blocking OpenAI client."""
    client = openai.OpenAI(base_url=base_url, api_key=args.api_key or "none", max_retries=0, timeout=3600)
    one_request(client, args, -1)  # warm-up

    def client_loop(c: int) -> list[dict]:
        return [one_request(client, args, c * args.requests + r) for r in range(args.requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [x for xs in pool.map(client_loop, range(concurrency)) for x in xs]
    return results, time.perf_counter() - t0


def run_level(base_url: str, args, concurrency: int) -> dict:
    cpu0 = time.process_time()
    run = _clients_async if args.client == "async" else _clients_threads
    results, wall = run(base_url, args, concurrency)
    cpu = time.process_time() - cpu0
    ttfts = [r["ttft"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": total,
            "wall_s": wall, "aggregate_tok_s": total / wall,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
            "stream_decode_tok_s": statistics.mean(r["decode_tps"] for r in results),
            "client_cpu_ms_per_token": 1000 * cpu / max(1, total)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started(cmd: list[str], port: int, env: dict):
    # the server's log goes to a file: a pipe nobody reads fills up (llama.cpp's server logs every
    # request's timings) and blocks the server mid-stream
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=2)
        deadline = time.time() + 600
        while True:
            try:
                client.models.list()
                break
            except openai.APIError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    log.seek(0)
                    raise SystemExit(f"{cmd[0]} did not start: {log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.5)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait(60)


def servers(args):
    """(name, context manager yielding a base URL) for each server to measure."""
    if args.base_url:
        yield "server", nullcontext(args.base_url)
    if args.gguf:
        env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        port = free_port()
        ours = [str(Path(sys.executable).with_name("mistralrs")), "--port", str(port), "--max-seqs",
                str(max(args.concurrency)), "--prefix-cache-n", "0", "-q", "gguf", "-f", args.gguf]
        yield "mistralrs-cli", started(ours, port, env)
        if args.llama_cpp:
            port = free_port()
            llama = [args.llama_python, "-m", "llama_cpp.server", "--model", args.gguf, "--port", str(port),
                     "--n_threads", str(args.threads), "--n_ctx", "4096",
                     "--interrupt_requests", "False"]  # its default: a new request cuts the streaming one off
            yield "llama.cpp", started(llama, port, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running server's /v1 URL")
    ap.add_argument("--gguf", help="start our server (and with --llama-cpp, llama.cpp's) on this file")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure python -m llama_cpp.server")
    peers = Path(os.environ.get("MISTRALRS_CLI_CACHE", Path.home() / ".cache" / "mistralrs-cli")) / "peers" / "bin" / "python"
    ap.add_argument("--llama-python", default=str(peers) if peers.exists() else sys.executable,
                    help="the python with llama-cpp-python[server] [default: scripts/peers_setup.sh's venv]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eos-id", type=int, default=2, help="EOS token id to suppress (SmolLM2: 2)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--client", choices=["threads", "async"], default="threads",
                    help="threads: a thread per client with the blocking OpenAI client; async: the clients "
                         "as asyncio tasks with AsyncOpenAI on one thread")
    args = ap.parse_args()
    if not args.base_url and not args.gguf:
        ap.error("give --base-url or --gguf")
    print(f"{'server':14} {'conc':>4} {'reqs':>5} {'agg tok/s':>10} {'stream tok/s':>12} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'client ms/tok':>13}", file=sys.stderr)
    for name, ctx in servers(args):
        with ctx as url:
            for c in args.concurrency:
                r = {"server": name, **run_level(url, args, c)}
                if args.json:
                    print(json.dumps(r), flush=True)
                else:
                    print(f"{name:14} {c:>4} {r['requests']:>5} {r['aggregate_tok_s']:>10.1f} "
                          f"{r['stream_decode_tok_s']:>12.1f} {r['ttft_p50_s']:>8.2f}s {r['ttft_p99_s']:>8.2f}s "
                          f"{r['client_cpu_ms_per_token']:>13.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
