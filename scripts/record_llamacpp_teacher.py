"""Record llama.cpp's teacher-forced logits for the two real models into a test fixture.

Run with a Python that has llama-cpp-python (the peers venv), never with this package:

    /root/.cache/mistralrs-cli/peers/bin/python scripts/record_llamacpp_teacher.py [--cache DIR]

Reads tests/fixtures/heldout_text.txt (the opening of the US Declaration of Independence, public
domain; chosen before any comparison was run, and used by no other test), tokenizes it with
llama.cpp (`llm.tokenize(text.encode(), add_bos=True)`), feeds the first N_POSITIONS ids in one
`llm.eval` with logits_all=True and keeps, per position, llama.cpp's top-K token ids and logits
(enough for its top-1 and its top-2 margin). llama.cpp's settings are llama-cpp-python's
defaults but for the thread count: flash attention off, f16 K and V caches.

Writes tests/fixtures/llamacpp_teacher.json. Also records how often llama.cpp's own top-1 with
flash attention on equals the recorded one, and how far its top-K logits move (RMS) across
that switch: the spread of llama.cpp's own arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import llama_cpp
import numpy as np

MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TEXT = FIXTURES / "heldout_text.txt"
N_POSITIONS = 512
TOP_K = 8
N_THREADS = 2
N_CTX = 1024


def scores(path: Path, ids: list[int], flash_attn: bool) -> np.ndarray:
    """(N_POSITIONS, n_vocab) logits: position i predicts ids[i + 1]."""
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=N_POSITIONS, n_ubatch=N_POSITIONS,
                          n_threads=N_THREADS, n_threads_batch=N_THREADS, logits_all=True,
                          flash_attn=flash_attn, verbose=False)
    llm.eval(ids[:N_POSITIONS])
    return np.array(llm.scores[:N_POSITIONS], dtype=np.float32)


def record(cache: Path) -> dict:
    text = TEXT.read_text()
    result = {"llama_cpp_python": llama_cpp.__version__, "text": TEXT.name, "positions": N_POSITIONS,
              "top_k": TOP_K,
              "settings": {"n_threads": N_THREADS, "n_ctx": N_CTX, "n_batch": N_POSITIONS,
                           "n_ubatch": N_POSITIONS, "flash_attn": False, "type_k": "f16", "type_v": "f16",
                           "logits_all": True, "add_bos": True},
              "models": {}}
    for name, file in MODELS.items():
        path = cache / file
        if not path.exists():
            raise SystemExit(f"missing {path}: run scripts/fetch_models.py first")
        vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        ids = vocab.tokenize(text.encode(), add_bos=True)
        if len(ids) < N_POSITIONS:
            raise SystemExit(f"{TEXT} is {len(ids)} tokens for {name}; need {N_POSITIONS}")
        logits = scores(path, ids, flash_attn=False)
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
        fa = scores(path, ids, flash_attn=True)
        fa_same = float((fa.argmax(-1) == logits.argmax(-1)).mean())
        # how far llama.cpp's own logits move between its two attention paths: RMS over each
        # position's top-K of the difference, less its mean (logits are defined up to a shift)
        moved = np.take_along_axis(fa, top, -1) - np.take_along_axis(logits, top, -1)
        fa_rms = float(np.sqrt(((moved - moved.mean(-1, keepdims=True)) ** 2).mean()))
        result["models"][name] = {
            "file": file, "ids": ids[:N_POSITIONS],
            "top_ids": top.tolist(),
            "top_logits": [[round(float(v), 5) for v in row] for row in np.take_along_axis(logits, top, -1)],
            "flash_attn_on_top1_agreement": fa_same, "flash_attn_on_topk_rms": round(fa_rms, 4),
        }
        print(f"{name}: {N_POSITIONS} positions; llama.cpp flash attention on vs off: top-1 agreement "
              f"{fa_same:.2%}, top-{TOP_K} logits moved {fa_rms:.3f} RMS")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli"
    ap.add_argument("--cache", type=Path, default=Path(root) / "models")
    args = ap.parse_args()
    data = record(args.cache)
    path = FIXTURES / "llamacpp_teacher.json"
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
