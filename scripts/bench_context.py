"""scripts/bench.py's long prompts and busy neighbour (imports nothing from the project).

long_prompt(n): a fixed English text cut to about n tokens of a model's tokenizer (llama.cpp's, in
the peers venv, when it is there; else ~4 characters a token), the same text for every engine.
Neighbour: a separate process that keeps one CPU busy (pinned to it), bounded in time and killed
when the benchmark ends.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# Sentences rotated per section, so the text does not repeat one paragraph verbatim (the speed of
# attention does not depend on the words, but the tokenizers see ordinary prose).
SENTENCES = [
    "The tool reads a quantized model file and builds the tokenizer from the metadata inside it.",
    "Loading takes less than a second once the file is in the operating system's page cache.",
    "The prompt is processed in large batches, so a long question costs little more than a short one.",
    "Memory use stays close to the size of the weights, because nothing is widened at load time.",
    "A careful reviewer measures each claim twice, on a quiet machine and on a busy one.",
    "Threads that wait for each other at every step lose most of their time when a core is taken.",
    "The cache of keys and values grows by one row per token and per layer of the model.",
    "Reading that cache once per generated token is the cost that long conversations pay.",
    "Sliding windows keep the local layers cheap, while the global layers see the whole text.",
    "Numbers from different days cannot be compared; ratios from one run can.",
    "Each engine starts as a fresh process, so the time to the first token includes the load.",
    "Finish with a short list of questions for the authors about threads, caches and memory.",
]


def long_text(sections: int = 240) -> str:
    """~50k characters: enough for 8k tokens of either real model's tokenizer."""
    out = []
    for i in range(sections):
        k = i % len(SENTENCES)
        body = " ".join(SENTENCES[k:] + SENTENCES[:k])
        out.append(f"Section {i + 1}. {body}")
    return "\n\n".join(out)


# Runs in the peers venv: for each target count, the longest prefix of the text (cut after a
# word) that llama.cpp's tokenizer makes at most that many tokens (BOS included when the model adds one).
CUT_PROBE = r'''
import json, sys
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
llm = Llama(model_path=cfg["model"], vocab_only=True, verbose=False)
text = cfg["text"]
spaces = [i for i, c in enumerate(text) if c == " "] + [len(text)]
count = lambda n: len(llm.tokenize(text[:n].encode("utf-8"), add_bos=True, special=False))
cuts = {}
for target in cfg["targets"]:
    lo, hi = 0, len(spaces) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(spaces[mid]) <= target: lo = mid
        else: hi = mid - 1
    cuts[str(target)] = spaces[lo]
print(json.dumps(cuts))
'''


def prompt_cuts(model: str, targets: list[int], peers_python: str | None) -> dict[int, int]:
    """Character cut of long_text() per target token count."""
    text = long_text()
    if peers_python and os.access(peers_python, os.X_OK) and targets:
        try:
            r = subprocess.run([peers_python, "-c", CUT_PROBE], input=json.dumps(
                {"model": model, "text": text, "targets": targets}), capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    print("# no llama.cpp tokenizer to cut the long prompts: ~4 characters a token", file=sys.stderr)
    return {t: min(len(text), 4 * t) for t in targets}


SPIN = r'''
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
'''


class Neighbour:
    """A process spinning on one CPU (the last this process may use) for at most `limit` s."""

    def __init__(self, limit: float):
        self.limit, self.proc, self.cpu = limit, None, max(os.sched_getaffinity(0))

    def __enter__(self) -> "Neighbour":
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN, str(self.cpu), repr(self.limit)])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
