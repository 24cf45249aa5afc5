"""scripts/bench.py's peer engines: the code each runs in the peers venv (llama-cpp-python, PyPI
mistralrs), printing one BENCH_RESULT line, and how bench.py asks for their versions."""

# Runs in the peers venv. argv[1] is a JSON config; BENCH_T0 is the wall time of the spawn.
LLAMA_RUNNER = r'''
import json, os, sys, time
cfg = json.loads(sys.argv[1]); T0 = float(os.environ["BENCH_T0"])
import numpy as np
import llama_cpp
from llama_cpp import Llama
t_load = time.perf_counter()
llm = Llama(model_path=cfg["model"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
            n_ctx=cfg["n_ctx"], n_batch=512, flash_attn=cfg["flash_attn"], verbose=False)
load_s = time.perf_counter() - t_load
n_vocab = llm.n_vocab()
def greedy():
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    return int(np.argmax(logits))
# add_bos=True means "add BOS if the vocab asks for it" (llama_tokenize's add_special)
toks = llm.tokenize(cfg["prompt"].encode("utf-8"), add_bos=True, special=False)
t_req = time.perf_counter()
llm.eval(toks)
tok = greedy()
t_first = time.perf_counter(); w_first = time.time()
out = [tok]
while len(out) < cfg["max_tokens"]:
    llm.eval([tok])
    tok = greedy()
    out.append(tok)
t_end = time.perf_counter()
n = len(out)
print("BENCH_RESULT " + json.dumps({
    "version": llama_cpp.__version__, "prompt_tokens": len(toks), "gen_tokens": n,
    "prefill_tps": len(toks) / (t_first - t_req), "decode_tps": (n - 1) / (t_end - t_first),
    "ttft_in": t_first - t_req, "ttft_start": w_first - T0, "load_s": load_s,
    "text": llm.detokenize(out).decode("utf-8", "replace")}), flush=True)
'''

MISTRALRS_RUNNER = r'''
import json, os, sys, tempfile, time
cfg = json.loads(sys.argv[1]); T0 = float(os.environ["BENCH_T0"])
from importlib.metadata import version
from mistralrs import Runner, Which, ChatCompletionRequest
# identity chat template: the model sees the raw prompt (BOS added by the template when the
# model's tokenizer wants one), so every engine gets the same input
tpl = os.path.join(tempfile.mkdtemp(), "identity.jinja")
with open(tpl, "w") as f:
    f.write(("{{ bos_token }}" if cfg["add_bos"] else "")
            + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
t_load = time.perf_counter()
runner = Runner(which=Which.GGUF(quantized_model_id=os.path.dirname(cfg["model"]),
                                 quantized_filename=os.path.basename(cfg["model"])),
                token_source="none", jinja_explicit=tpl)
load_s = time.perf_counter() - t_load
req = ChatCompletionRequest(messages=[{"role": "user", "content": cfg["prompt"]}], model="bench",
                            max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True,
                            stream=True)
t_req = time.perf_counter()
t_first = w_first = None; chunks = 0; usage = None; text = []
for ch in runner.send_chat_completion_request(req):
    now = time.perf_counter()
    c = ch.choices[0] if ch.choices else None
    if c is not None and c.delta is not None and c.delta.content:
        if t_first is None:
            t_first, w_first = now, time.time()
        chunks += 1; text.append(c.delta.content); t_last = now
    if getattr(ch, "usage", None) is not None:
        usage = ch.usage
u = usage
print("BENCH_RESULT " + json.dumps({
    "version": version("mistralrs"),
    "prompt_tokens": u.prompt_tokens if u else None, "gen_tokens": u.completion_tokens if u else chunks,
    "prefill_tps": u.avg_prompt_tok_per_sec if u else None,
    "decode_tps": u.avg_compl_tok_per_sec if u else None,
    "own_prefill_tps": (u.prompt_tokens / (t_first - t_req)) if u and t_first else None,
    "own_decode_tps": (chunks - 1) / (t_last - t_first) if chunks > 1 else None,
    "ttft_in": t_first - t_req if t_first else None,
    "ttft_start": w_first - T0 if w_first else None, "load_s": load_s, "chunks": chunks,
    "text": "".join(text)}), flush=True)
'''

PEER_PROBES = {"llama.cpp": "import llama_cpp; print(llama_cpp.__version__)",
               "llama.cpp-fa": "import llama_cpp; print(llama_cpp.__version__)",
               "mistral.rs": "from importlib.metadata import version; import mistralrs; "
                             "print(version('mistralrs'))"}
