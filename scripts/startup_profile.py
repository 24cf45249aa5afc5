#!/usr/bin/env python3
"""Where a one-shot's start-up goes: a timeline of the load's steps.

Runs `mistralrs --raw --prompt TEXT gguf -f FILE` in this process with a marker at the start and
end of each step of the load (STEPS): milliseconds since the process started, the process's CPU
time and the thread's CPU time, and which thread. python -X importtime and cProfile (python -m
cProfile -m mistralrs_cli ...) give the rest of the picture.

  python scripts/startup_profile.py [--model FILE] [--prompt TEXT]
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time
from pathlib import Path

MODELS = Path(os.environ.get("MISTRALRS_CLI_CACHE", Path.home() / ".cache" / "mistralrs-cli")) / "models"
DEFAULT_MODEL = MODELS / "gemma-3-270m-q4_k_m.gguf"
# module -> the functions timed there (each wrapped when its module is first imported)
STEPS = {
    "mistralrs_cli.run": ["run"],
    "mistralrs_cli.loaders.tokenizer_cache": ["prefetch_gguf_tokenizer", "take_prefetched"],
    "mistralrs_cli.loaders.load": ["GGUFFile", "_native_model", "_template_code", "_tokenizer",
                                   "_chat_template"],
    "mistralrs_cli.loaders.tokenizer": ["load_cache", "build_from_gguf"],
    "mistralrs_cli.outputs.oneshot": ["_load", "completion_ids", "chat_ids"],
}


def _process_start() -> float:
    """The epoch time this process started (/proc; 10 ms resolution), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def timeline(args) -> None:
    t0, events = _process_start(), []

    def mark(what: str) -> None:
        events.append(((time.time() - t0) * 1e3, time.process_time() * 1e3, time.thread_time() * 1e3,
                       threading.current_thread().name, what))

    def wrap(module, name: str) -> None:
        fn = getattr(module, name)

        def timed(*a, **k):
            mark("> " + name)
            try:
                return fn(*a, **k)
            finally:
                mark("< " + name)
        setattr(module, name, timed)

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in STEPS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                mark("import " + fullname)
                run_module(module)
                for name in STEPS[fullname]:
                    if hasattr(module, name):
                        wrap(module, name)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
    mark("script start")
    out = sys.stdout.write

    def first_write(s):
        if not any(e[4] == "first stdout" for e in events):
            mark("first stdout")
        return out(s)
    sys.stdout.write = first_write
    from mistralrs_cli.cli import main

    sys.argv = ["mistralrs", "--raw", "--ignore-eos", "--max-tokens", "1", "--temperature", "0", "--prompt",
                args.prompt, "gguf", "-f", str(args.model)]
    try:
        main()
    except SystemExit:
        pass
    sys.stdout.write = out
    print("    wall ms  process CPU ms  thread CPU ms  thread      step", file=sys.stderr)
    for wall, cpu, tcpu, thread, what in events:
        print(f"{wall:11.1f} {cpu:15.1f} {tcpu:14.1f}  {thread[:10]:10s}  {what}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--prompt", default="Write a careful review of these claims about a small command-line tool.")
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"error: --model {args.model} does not exist (scripts/fetch_models.py fetches the test models)")
    timeline(args)


if __name__ == "__main__":
    main()
