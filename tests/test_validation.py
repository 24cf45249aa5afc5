"""One set of rules for every sampling and engine parameter, on each surface that takes it: the
command line (exit 1, one `error:` line naming the flag, no traceback), the HTTP server (400 in
OpenAI's error shape with `param` set, and the server still answers a normal request after) and
the Python API (a UserError whose message starts with the Python field). The expected ranges are
OpenAI's published ones (presence/frequency penalty in [-2, 2], logit_bias values in [-100, 100],
top_logprobs 0..20) or the issue's (seeds are u64, probabilities in [0, 1], penalties > 0)."""
from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest

import gguf_builder as gb
from mistralrs_cli.api import ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_cli.engine.sampler import apply_logit_bias, sample
from mistralrs_cli.errors import UserError
from mistralrs_cli.types import EngineConfig, SamplingParams
from mistralrs_cli.validation import Limits, ParamError
from test_server import MSGS, TEMPLATE, serve

MISTRALRS = Path(sys.executable).with_name("mistralrs")
NAN, INF = float("nan"), float("inf")

# field, a bad value, the text the message must hold (besides the field's name)
BAD_VALUES = [
    ("temperature", -0.5, "0 or more"), ("temperature", NAN, "finite"), ("temperature", INF, "finite"),
    ("top_p", 0.0, "more than 0"), ("top_p", 1.5, "at most 1"), ("top_p", NAN, "finite"),
    ("min_p", 5.0, "between 0 and 1"), ("min_p", -0.1, "between 0 and 1"),
    ("top_k", -2, "-1 or more"),
    ("repetition_penalty", 0.0, "more than 0"), ("repetition_penalty", -1.0, "more than 0"),
    ("repetition_penalty", NAN, "finite"),
    ("presence_penalty", 3.0, "between -2 and 2"), ("frequency_penalty", -2.5, "between -2 and 2"),
    ("frequency_penalty", -INF, "finite"),
    ("repeat_last_n", -1, "0 or more"),
    ("seed", -1, "between 0 and 18446744073709551615"), ("seed", 2**64, "between 0 and 18446744073709551615"),
    ("max_tokens", 0, "got 0."),  # "1 or more", or "between 1 and the model's context (512)" once known
]
# the same rules for the sizes, with the default limits
BAD_SIZES = [
    ("n", 0, "between 1 and 128"), ("n", 129, "--max-n"),
    ("top_logprobs", -5, "between 0 and 20"), ("top_logprobs", 21, "between 0 and 20"),
    ("stop", ["x"] * 17, "more than the limit of 16"), ("stop", ["x" * 257], "more than the limit of 256"),
    ("stop_token_ids", [-1], "0..511"), ("stop_token_ids", [512], "0..511"),
    ("logit_bias", {-1: 5.0}, "-1, outside the vocabulary (0..511)"),
    ("logit_bias", {512: 5.0}, "outside the vocabulary (0..511)"),
    ("logit_bias", {5: NAN}, "between -100 and 100"), ("logit_bias", {5: 101.0}, "between -100 and 100"),
]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _id(case) -> str:
    return f"{case[0]}={str(case[1])[:20]}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("validation")
    return gb.write_gguf(d / "tiny.gguf", gb.tiny_llama(0), gb.gguf_vocab(gb.train_tokenizer()), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def runner(model) -> Runner:
    return Runner(Which.GGUF(None, str(model)))


# ---- the command line ----
def _cli(args: list, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(MISTRALRS), *args], input=stdin if stdin is not None else b"", capture_output=True,
                          env=env, cwd=cwd, timeout=120)


CLI_CASES = {
    **{f"{f}={v}": ([_flag(f), str(v)], _flag(f)) for f, v, _ in BAD_VALUES},
    "max-seqs-0": (["--max-seqs", "0"], "--max-seqs"),
    "max-seqs-huge": (["--max-seqs", str(10**9)], "--max-seqs"),
    "pa-blk-size-huge": (["--pa-blk-size", str(10**9)], "--pa-blk-size"),
    "pa-blk-size-0": (["--pa-blk-size", "0"], "--pa-blk-size"),
    "pa-gpu-mem-huge": (["--pa-gpu-mem", "1e12"], "--pa-gpu-mem"),
    "pa-gpu-mem-nan": (["--pa-gpu-mem", "nan"], "--pa-gpu-mem"),
    "pa-gpu-mem-usage-0": (["--pa-gpu-mem-usage", "0"], "--pa-gpu-mem-usage"),
    "pa-gpu-mem-usage-nan": (["--pa-gpu-mem-usage", "nan"], "--pa-gpu-mem-usage"),
    "pa-ctxt-len-0": (["--pa-ctxt-len", "0"], "--pa-ctxt-len"),
    "pa-ctxt-len-huge": (["--pa-ctxt-len", str(2**40)], "--pa-ctxt-len"),
    "prefix-cache-n-huge": (["--prefix-cache-n", str(10**12)], "--prefix-cache-n"),
    "max-stop-strings-0": (["--max-stop-strings", "0"], "--max-stop-strings"),
    "max-n-negative": (["--max-n", "-3"], "--max-n"),
}


@pytest.fixture(scope="module")
def cli_results(model, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    runs = {name: ([*args, "--prompt", "hi", "gguf", "-f", str(model)], None) for name, (args, _) in CLI_CASES.items()}
    runs["prompt-not-utf8"] = ([b"--prompt", b"caf\xe9 \xff", b"gguf", b"-f", str(model).encode()], None)
    runs["stdin-not-utf8"] = (["--prompt", "-", "gguf", "-f", str(model)], b"hello \xc3\x28 world")
    # a pool the model's KV cache cannot fit: found once the model's size per token is known
    runs["pa-ctxt-len-past-ram"] = (["--pa-ctxt-len", str(2**31 - 1), "--prompt", "hi", "gguf", "-f", str(model)], None)
    runs["interactive-not-utf8"] = (["--temperature", "0", "--max-tokens", "2", "-i", "gguf", "-f", str(model)],
                                    b"caf\xe9 \xff\nhello\n")
    runs["control"] = (["--temperature", "0", "--max-tokens", "2", "--prompt", "hi", "gguf", "-f", str(model)], None)
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(_cli, args, stdin, cwd) for name, (args, stdin) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    err = p.stderr.decode("utf-8", errors="replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses_in_one_line(cli_results, name):
    line = _one_error_line(cli_results[name])
    assert CLI_CASES[name][1] in line


@pytest.mark.parametrize("field, value, text", BAD_VALUES, ids=[_id(c) for c in BAD_VALUES])
def test_cli_says_the_rule(cli_results, field, value, text):
    line = _one_error_line(cli_results[f"{field}={value}"])
    assert line.startswith(f"error: {_flag(field)} must be") and text in line


def test_cli_invalid_utf8_prompt_and_stdin(cli_results):
    assert "--prompt" in _one_error_line(cli_results["prompt-not-utf8"])
    line = _one_error_line(cli_results["stdin-not-utf8"])
    assert "stdin" in line and "UTF-8" in line and "offset 6" in line  # where the bad byte is


def test_interactive_names_a_line_that_is_not_utf8_and_goes_on(cli_results):
    p = cli_results["interactive-not-utf8"]
    err = p.stderr.decode("utf-8", errors="replace")
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "error: that line is not UTF-8 text (an invalid byte at character 3)" in err
    assert "generated: 2 tokens" in err  # the next line was answered


def test_cli_kv_pool_larger_than_ram(cli_results):
    line = _one_error_line(cli_results["pa-ctxt-len-past-ram"])
    assert "--pa-ctxt-len 2147483647" in line and "RAM" in line


def test_cli_control_run_generates(cli_results):
    p = cli_results["control"]
    assert p.returncode == 0, p.stderr


def test_limit_flags_are_in_help():
    out = subprocess.run([str(MISTRALRS), "--help"], capture_output=True, text=True, timeout=60).stdout
    for f in ("--max-body-bytes", "--max-json-depth", "--max-stop-strings", "--max-stop-length", "--max-n",
              "--max-top-logprobs", "--max-logit-bias", "--max-stop-token-ids"):
        assert f in out


# ---- the server ----
@pytest.fixture(scope="module")
def srv(runner):
    runner.loaded.generation_config = {"temperature": 0.0}
    with serve(runner.loaded) as s:
        yield s


def _server_body(field: str, value) -> dict:
    if field == "top_logprobs":
        return {"logprobs": True, "top_logprobs": value}
    if field == "logit_bias":
        return {"logit_bias": {str(k): v for k, v in value.items()}}
    return {field: value}


def _post_raw(srv, body: dict) -> httpx.Response:
    # json.dumps writes NaN and Infinity as the bare literals Python's json module (and so a
    # FastAPI server) accepts: the server must refuse them itself
    raw = json.dumps({"messages": MSGS, "max_tokens": 2, **body}).encode()
    return httpx.post(srv.url + "/v1/chat/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=120)


def _still_serves(srv) -> None:
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("field, value, text", BAD_VALUES + BAD_SIZES, ids=[_id(c) for c in BAD_VALUES + BAD_SIZES])
def test_server_refuses_with_400(srv, field, value, text):
    r = _post_raw(srv, _server_body(field, value))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if text == "finite" or (field == "logit_bias" and value.get(5, 0) != value.get(5, 0)):
        # NaN/Infinity are not JSON: the body is refused as it is parsed, before any field is read
        assert "NaN" in err["message"] or "Infinity" in err["message"], err
    else:
        assert err["param"] == field and err["message"].startswith(field) and text in err["message"], err
    _still_serves(srv)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_server_refuses_json_nan_literals(srv, literal):
    raw = b'{"prompt": "hi", "max_tokens": 2, "temperature": %s}' % literal.encode()
    r = httpx.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and literal.lstrip("-") in r.json()["error"]["message"], r.text
    _still_serves(srv)


def test_protocol_refuses_non_finite_numbers_itself(runner):
    """Behind the parser's NaN check, the request rules refuse non-finite numbers on their own
    (a body built in Python, not parsed from JSON)."""
    from mistralrs_cli.outputs.server.protocol import ApiError, parse_completion

    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        with pytest.raises(ApiError) as e:
            parse_completion({"prompt": "hi", field: NAN}, runner.loaded)
        assert e.value.status == 400 and e.value.param == field and "finite" in e.value.message
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "hi", "logit_bias": {"5": INF}}, runner.loaded)
    assert e.value.param == "logit_bias"


def test_server_completions_logprobs_bound(srv):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text


def test_server_thousands_of_long_stop_strings_are_refused_at_once(srv):
    """4000 stop strings of 4000 characters (a 16 MB body) took 8 minutes of engine time."""
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the run instead of stalling it
    try:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                       json={"messages": MSGS, "stop": ["ab" * 2000] * 4000, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text[:300]
        assert time.monotonic() - t0 < 60
    finally:
        faulthandler.cancel_dump_traceback_later()
    _still_serves(srv)


def test_server_stops_at_the_limits_still_work(srv):
    """16 stop strings of 256 characters (the limits) and a stop that matches: cut as before."""
    first = httpx.post(srv.url + "/v1/completions", json={"prompt": "the quick", "max_tokens": 8,
                                                          "temperature": 0}).json()["choices"][0]["text"]
    word = first.strip().split()[0] if first.strip() else first[:1]
    stops = ["z" * 256] * 15 + [word]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "the quick", "max_tokens": 8, "temperature": 0,
                                                      "stop": stops})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == first[:first.index(word)]


def test_server_stop_token_ids_end_the_answer(srv, runner):
    """stop_token_ids (as vLLM's): the first greedy token, named as a stop id, ends the answer at once."""
    first = [o.token_id for o in runner.stream([5, 6], SamplingParams(temperature=0.0, max_tokens=1))][-1]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 5, "temperature": 0,
                                                      "stop_token_ids": [first]}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == ""


# ---- the Python API ----
PY_REQUESTS = [(f, v, t) for f, v, t in BAD_VALUES + BAD_SIZES]


@pytest.mark.parametrize("field, value, text", PY_REQUESTS, ids=[_id(c) for c in PY_REQUESTS])
def test_python_request_refused(runner, field, value, text):
    kw = {"logprobs": True} if field == "top_logprobs" else {}
    for req in (ChatCompletionRequest(messages=MSGS, **kw, **{field: value}),
                CompletionRequest(prompt="hi", **kw, **{field: value})):
        send = runner.send_chat_completion_request if isinstance(req, ChatCompletionRequest) else \
            runner.send_completion_request
        with pytest.raises(UserError) as e:
            send(req)
        assert str(e.value).startswith(field) and text.replace("--max-n", "limits") in str(e.value), e.value
        assert e.value.field == field


def test_python_stream_checks_raw_sampling_params(runner):
    for params, field in ((SamplingParams(temperature=NAN), "temperature"),
                          (SamplingParams(logit_bias={-1: 100.0}), "logit_bias"),
                          (SamplingParams(seed=-1), "seed"), (SamplingParams(top_logprobs=-5), "top_logprobs")):
        with pytest.raises(ParamError, match=f"^{field}"):
            next(iter(runner.stream([2, 3], params)))


def test_python_stream_checks_prompt_ids(runner):
    for ids in ([-1], [2, 512]):
        with pytest.raises(ParamError, match=r"^prompt_ids has .*\(0\.\.511\)"):
            next(iter(runner.stream(ids, SamplingParams(max_tokens=1))))


def test_python_which_must_be_a_which(model):
    for bad in ("x", None, 3, {"quantized_filename": str(model)}):
        with pytest.raises(UserError) as e:
            Runner(which=bad)
        assert str(e.value).startswith("which must be") and "Which.GGUF" in str(e.value)
        assert isinstance(e.value, TypeError)  # and a Python caller may catch it as one


def test_python_engine_settings(model, runner):
    faulthandler.dump_traceback_later(120, exit=True)  # max_seqs=0 used to hang here
    try:
        for kw, field in ((dict(max_seqs=0), "max_seqs"), (dict(max_seqs=-1), "max_seqs"),
                          (dict(engine_config=EngineConfig(max_seqs=0)), "engine_config.max_seqs"),
                          (dict(engine_config=EngineConfig(block_size=10**9)), "engine_config.block_size"),
                          (dict(engine_config=EngineConfig(kv_mem_mb=NAN)), "engine_config.kv_mem_mb"),
                          (dict(engine_config=EngineConfig(kv_tokens=2**31 - 1)), "engine_config.kv_tokens"),
                          (dict(limits=Limits(max_n=0)), "limits.max_n")):
            with pytest.raises(UserError) as e:
                Runner(Which.GGUF(None, str(model)), loaded=runner.loaded, **kw)
            assert str(e.value).startswith(field), e.value
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_python_detokenize_refuses_ids_outside_the_vocab(runner):
    for ids in ([-1], [512], [1, 2, 10**12], ["a"], [1.5]):
        with pytest.raises(UserError, match=r"^ids has .*not a token id of the vocabulary \(0\.\.511\)"):
            runner.detokenize_text(ids)
    assert runner.detokenize_text(runner.tokenize_text("the quick", add_special_tokens=False)) == "the quick"


def test_python_raised_limits_allow_more(model, runner):
    r = Runner(Which.GGUF(None, str(model)), loaded=runner.loaded, limits=Limits(max_n=200, max_stop_strings=40))
    out = r.send_completion_request(CompletionRequest(prompt="hi", max_tokens=1, n=130, stop=["x", "y"] * 20,
                                                      temperature=0))
    assert len(out.choices) == 130


# ---- the sampler itself ----
def test_logit_bias_minus_one_does_not_touch_the_last_token():
    logits = np.arange(8, dtype=np.float32)
    out = apply_logit_bias(logits, {-1: 100.0, 8: 100.0, 2: 1.5})
    assert out.tolist() == [0, 1, 3.5, 3, 4, 5, 6, 7]


def test_penalties_skip_ids_outside_the_logits():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    out = sample(logits, [-1, 3, 7], SamplingParams(temperature=0.0, repetition_penalty=100.0, presence_penalty=2.0))
    assert out.token == 2  # the last token, untouched by the history's -1


def test_tiny_repetition_penalty_still_samples_a_seen_token():
    """penalty 1e-40 pushes a seen positive logit to +inf in float32: it takes all the mass
    (inf - inf used to turn every probability into NaN)."""
    logits = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    p = SamplingParams(temperature=1.0, repetition_penalty=1e-40, logprobs=True, top_logprobs=2)
    for seed in range(5):
        s = sample(logits, [2], p, np.random.default_rng(seed))
        assert s.token == 2 and np.isfinite(s.logprob)


# ---- mistralrs-bench ----
def test_bench_throughput_counts_generated_tokens(runner):
    """tg 1000 on a 512-token context generates 511 tokens: throughput = generated / wall, and the
    wall covers the decode, so it is at most t/s x generated / (generated - 1) (asked-for tokens
    would give about twice that)."""
    from mistralrs_cli.outputs.bench import BenchOptions, run_tests

    rows = run_tests(runner.loaded, BenchOptions(n_prompt=0, n_gen=1000, concurrency=[1], repetitions=1))
    gen = runner.loaded.max_context - 1
    assert rows[0].throughput <= rows[0].tps_mean * gen / (gen - 1) * 1.0001


def test_limit_flags_reach_the_run_options(monkeypatch):
    """--max-* flags fill RunOptions.limits (which the server and the rules read)."""
    from typer.testing import CliRunner

    import mistralrs_cli.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run", lambda opts, spec: seen.setdefault("limits", opts.limits))
    r = CliRunner().invoke(cli.app, ["--max-stop-strings", "4000", "--max-stop-length", "4000", "--max-n", "7",
                                     "--max-top-logprobs", "30", "--max-logit-bias", "9", "--max-stop-token-ids", "3",
                                     "--max-body-bytes", "1000", "--max-json-depth", "5", "gguf", "-f", "x.gguf"])
    assert r.exit_code == 0, r.output
    assert seen["limits"] == Limits(max_body_bytes=1000, max_json_depth=5, max_stop_strings=4000, max_stop_length=4000,
                                    max_n=7, max_top_logprobs=30, max_logit_bias=9, max_stop_token_ids=3)


def test_raised_stop_limits_generate_in_bounded_time(model, runner):
    """With the limits raised to admit them, 4000 stop strings of 4000 characters (8 minutes of
    engine time for one request before) cost one request seconds: the matcher searches only the
    window a new match can end in. A generous bound, for a slow shared machine."""
    rng = np.random.default_rng(0)
    stops = ["".join(rng.choice(list("qz"), 4000)) for _ in range(4000)]
    r = Runner(Which.GGUF(None, str(model)), loaded=runner.loaded,
               limits=Limits(max_stop_strings=4000, max_stop_length=4000))
    faulthandler.dump_traceback_later(180, exit=True)
    try:
        t0 = time.monotonic()
        out = r.send_completion_request(CompletionRequest(prompt="the quick", max_tokens=24, ignore_eos=True,
                                                          temperature=0, stop=stops))
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 24
        assert time.monotonic() - t0 < 60
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_readme_states_the_default_limits():
    """The README's numbers are the defaults (the server's tests exercise body size and depth)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    d = Limits()
    assert (d.max_body_bytes, d.max_json_depth) == (16 * 2**20, 64)
    for claim in ("16 stop strings (OpenAI allows 4) of\n256 characters", "`n` up to 128",
                  "`top_logprobs` up to 20", "1024 `logit_bias` entries", "a 16 MiB body", "nested at most 64"):
        assert claim in readme, claim
    assert (d.max_stop_strings, d.max_stop_length, d.max_n, d.max_top_logprobs, d.max_logit_bias) == (
        16, 256, 128, 20, 1024)
