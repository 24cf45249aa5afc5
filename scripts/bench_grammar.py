"""What a grammar costs: decode tok/s with a JSON schema against the same request without one, at
batch 1 and 16 on SmolLM2 (the native runtime), time to first token with a 50-property schema
(compiled for the request, as a new schema is) against the same prompt without, and llama.cpp's
GBNF JSON-schema path (llama-cpp-python's LlamaGrammar.from_json_schema, in the peers venv) on the
same file in the same run. Runs alternate with/without in one process (the machine is shared);
medians of --rounds.

    .venv/bin/python scripts/bench_grammar.py [--tokens 128] [--rounds 5]

Decode uses a schema the model cannot finish within --tokens (an array of at least 50 objects),
ignore_eos on both sides, temperature 0.7; llama.cpp's side biases EOS away instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.loaders.load import load
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, GGUFSpec, Grammar, LoadOptions, SamplingParams

MODEL = Path.home() / ".cache" / "mistralrs-cli" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PEERS = Path.home() / ".cache" / "mistralrs-cli" / "peers" / "bin" / "python"
LONG = {"type": "object", "required": ["products"], "properties": {"products": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "required": ["name", "price", "tags"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 24}, "price": {"type": "number", "minimum": 0},
                       "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}, "maxItems": 3}}}}}}
DECODE_PROMPT = "List fifty products with a name, a price and tags, as JSON."
TTFT_PROMPT = "Fill in the form for a new customer record."


def wide(tag: str) -> dict:
    """50 properties (strings, integers, booleans, enums); `tag` makes each round's schema new."""
    kinds = [{"type": "string", "maxLength": 30}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
             {"enum": ["a", "b", "c"]}]
    props = {f"{tag}_field_{i}": kinds[i % 4] for i in range(50)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def decode_tps(engine: Engine, ids: list[int], grammar: Grammar | None, batch: int, tokens: int) -> float:
    """Tokens per second over the steps after every request has its first token."""
    reqs = [engine.add_request(ids, SamplingParams(temperature=0.7, seed=i, max_tokens=tokens, ignore_eos=True,
                                                   grammar=grammar)) for i in range(batch)]
    while any(not r.output_ids for r in reqs):
        engine.step()
    t0, n0 = time.perf_counter(), sum(len(r.output_ids) for r in reqs)
    while engine.has_unfinished():
        engine.step()
    return (sum(len(r.output_ids) for r in reqs) - n0) / (time.perf_counter() - t0)


def ttft(engine: Engine, ids: list[int], grammar: Grammar | None) -> float:
    t0 = time.perf_counter()
    req = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=1, grammar=grammar))
    while not req.output_ids:
        engine.step()
    dt = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return dt


def ours(args) -> dict:
    loaded = load(GGUFSpec(str(MODEL)), LoadOptions(token_source="none"))
    msgs = lambda text: chat_ids(loaded, [{"role": "user", "content": text}])  # noqa: E731
    engine = Engine(loaded, EngineConfig(max_seqs=16, prefix_cache_n=0))
    long_g = Grammar("json_schema", json.dumps(LONG))
    from mistralrs_cli.grammar.vocab import ll_tokenizer

    t = time.perf_counter()
    ll_tokenizer(loaded.tokenizer, loaded.eos_ids)  # what the first grammar request builds, once
    res = {"llguidance tokenizer build (s)": time.perf_counter() - t}
    decode_tps(engine, msgs(DECODE_PROMPT), long_g, 1, 4)  # warm-up
    for batch in (1, 16):
        plain, gram = [], []
        for _ in range(args.rounds):
            plain.append(decode_tps(engine, msgs(DECODE_PROMPT), None, batch, args.tokens))
            gram.append(decode_tps(engine, msgs(DECODE_PROMPT), long_g, batch, args.tokens))
        res[f"decode_b{batch}"] = (statistics.median(plain), statistics.median(gram))
    plain, gram = [], []
    for r in range(args.rounds):
        plain.append(ttft(engine, msgs(TTFT_PROMPT), None))
        gram.append(ttft(engine, msgs(TTFT_PROMPT), Grammar("json_schema", json.dumps(wide(f"r{r}")))))
    res["ttft_50_props"] = (statistics.median(plain), statistics.median(gram))
    res["prompt_tokens"] = (len(msgs(DECODE_PROMPT)), len(msgs(TTFT_PROMPT)))
    return res


LLAMA = r'''
import json, statistics, sys, time
cfg = json.loads(sys.argv[1])
from llama_cpp import Llama, LlamaGrammar
llm = Llama(model_path=cfg["model"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_ctx=2048,
            verbose=False)
eos = llm.token_eos()
def chat(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
def run(prompt, schema, n, bias):
    g = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema is not None else None
    times = []
    t0 = time.perf_counter()
    for _ in llm.create_completion(chat(prompt), max_tokens=n, temperature=0.7, seed=1, grammar=g, stream=True,
                                   logit_bias={eos: -100.0} if bias else None):
        times.append(time.perf_counter())
    return times, t0
res = {"version": __import__("llama_cpp").__version__}
plain, gram, tp, tg = [], [], [], []
for r in range(cfg["rounds"]):
    for schema, out in ((None, plain), (cfg["long"], gram)):
        times, _ = run(cfg["decode_prompt"], schema, cfg["tokens"], True)
        out.append((len(times) - 1) / (times[-1] - times[0]))
    for schema, out in ((None, tp), (cfg["wide"][r], tg)):
        llm.reset()  # no prompt cache: a full prefill each time, as ours
        times, t0 = run(cfg["ttft_prompt"], schema, 1, False)
        out.append(times[0] - t0)
res["decode_b1"] = (statistics.median(plain), statistics.median(gram))
res["ttft_50_props"] = (statistics.median(tp), statistics.median(tg))
print("BENCH_RESULT " + json.dumps(res), flush=True)
'''


def llama(args) -> dict | None:
    if not PEERS.exists():
        return None
    cfg = dict(model=str(MODEL), threads=args.llama_threads, rounds=args.rounds, tokens=args.tokens, long=LONG, decode_prompt=DECODE_PROMPT,
               ttft_prompt=TTFT_PROMPT, wide=[wide(f"r{r}") for r in range(args.rounds)])
    out = subprocess.run([str(PEERS), "-c", LLAMA, json.dumps(cfg)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.llama_threads)}, timeout=1800)
    line = [x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    return json.loads(line[0].split(" ", 1)[1]) if line else {"error": out.stderr[-500:]}


def show(name: str, res: dict | None) -> None:
    print(f"== {name}")
    for key, value in (res or {"skipped": "no peers venv"}).items():
        if isinstance(value, (list, tuple)) and len(value) == 2 and key != "prompt_tokens":
            a, b = value
            ratio = b / a
            unit = "tok/s" if key.startswith("decode") else "s"
            print(f"  {key:32s} without {a:9.4f} {unit}   with {b:9.4f} {unit}   with/without {ratio:.3f}")
        else:
            print(f"  {key:32s} {value}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    # llama.cpp's threads spin while they wait: on a shared 2-core machine two of them collapsed to
    # ~1.5 tok/s (one: ~28), so one by default; its with/without ratio is what is compared
    ap.add_argument("--llama-threads", type=int, default=1)
    args = ap.parse_args()
    show("mistralrs-cli (native runtime, --numerics precise)", ours(args))
    show(f"llama.cpp (llama-cpp-python, GBNF from LlamaGrammar.from_json_schema; batch 1 only, "
         f"{args.llama_threads} thread(s))", llama(args))


if __name__ == "__main__":
    main()
