"""Property tests of every sampling parameter at its edges (hypothesis, fixed seed): finite, NaN,
inf, huge and negative values, random logit_bias maps and stop lists. Each outcome is either one
UserError from the shared rules (validation.py) or a valid result:

- the sampler's probabilities equal a softmax computed here by hand in float64 (penalties ->
  bias -> temperature -> top-k -> top-p -> min-p, written from the definitions) and sum to 1;
- a generation from a tiny model has tokens in the vocabulary and an allowed finish reason;
- the server's request parser gives a 400 naming a field, or parameters the rules accept;
- stop strings matched as the engine streams (token_text.find_stop) give the text a naive
  search over the whole text gives, and never send a stop string's characters.

CI runs a bounded number of examples (about 30 s in all); for a longer run by hand:
    MISTRALRS_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz_sampling.py
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gguf_builder as gb
from mistralrs_cli import validation
from mistralrs_cli.api import CompletionRequest, Runner, Which
from mistralrs_cli.engine.sampler import apply_logit_bias, apply_penalties, filter_probs, sample, softmax
from mistralrs_cli.engine.token_text import find_stop
from mistralrs_cli.errors import UserError
from mistralrs_cli.types import SamplingParams

N = int(os.environ.get("MISTRALRS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def examples(default: int) -> settings:
    return settings(FUZZ, max_examples=N or default)


EDGES = [0.0, -0.0, 1e-300, 1e-7, 0.5, 1.0, 2.0, 2.0000001, 100.0, 1e38, 1e308, -1e-9, -1.0, -2.0, -1e308,
         math.nan, math.inf, -math.inf]
floats = st.one_of(st.sampled_from(EDGES), st.floats(allow_nan=True, allow_infinity=True))
ints = st.one_of(st.sampled_from([0, 1, -1, -2, 5, 20, 21, 511, 512, 2**63, 2**64 - 1, 2**64, -(2**64)]),
                 st.integers(-(2**70), 2**70))
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731  (None: the field is not set)
bias_maps = st.dictionaries(ints, floats, max_size=6)
stop_lists = st.one_of(st.text(max_size=5), st.lists(st.text(alphabet="ab \n", max_size=300), max_size=20))

sampling_fields = st.fixed_dictionaries({}, optional={
    "temperature": floats, "top_p": floats, "min_p": floats, "top_k": ints, "repetition_penalty": floats,
    "presence_penalty": floats, "frequency_penalty": floats, "repeat_last_n": ints, "seed": ints,
    "max_tokens": ints, "n": ints, "top_logprobs": ints, "logit_bias": bias_maps, "stop": stop_lists,
    "stop_token_ids": st.lists(ints, max_size=4)})


# ---- the sampler against a softmax computed by hand ----
def reference_probs(logits: list[float], history: list[int], p: SamplingParams) -> list[float]:
    """The distribution the sampler must draw from, in float64, from the definitions (HF's
    repetition penalty; OpenAI's presence/frequency penalties; nucleus as 'keep tokens until
    the mass before them reaches top_p'; min-p relative to the top token)."""
    x = list(logits)
    window = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
    for t in set(window):
        if p.repetition_penalty not in (None, 1.0):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.presence_penalty + p.frequency_penalty * window.count(t)
    for t, b in p.logit_bias.items():
        x[t] += b
    m = max(v / p.temperature for v in x)
    e = [math.exp(v / p.temperature - m) for v in x]
    probs = [v / sum(e) for v in e]
    if p.top_k and p.top_k < len(probs):
        kth = sorted(probs, reverse=True)[p.top_k - 1]
        probs = [v if v >= kth else 0.0 for v in probs]
    if p.top_p is not None and p.top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        mass, keep = 0.0, set()
        for i in order:
            if probs[i] == 0 or (keep and mass >= p.top_p):
                break
            keep.add(i)
            mass += probs[i]
        probs = [v if i in keep else 0.0 for i, v in enumerate(probs)]
    if p.min_p:
        top = max(probs)
        probs = [v if v >= p.min_p * top else 0.0 for v in probs]
    return [v / sum(probs) for v in probs]


def _sampler_probs(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    x = apply_logit_bias(apply_penalties(logits, history, p), p.logit_bias)
    return filter_probs(softmax(x / np.float32(p.temperature)), p)


moderate = st.floats(-4, 4, allow_nan=False).map(lambda v: round(v, 2))


@examples(300)
@given(logits=st.lists(moderate, min_size=2, max_size=8), history=st.lists(st.integers(0, 7), max_size=6),
       temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5, 4.0]), top_k=st.integers(0, 8),
       top_p=maybe(st.sampled_from([0.05, 0.3, 0.6, 0.9, 1.0])), min_p=maybe(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
       rep=maybe(st.sampled_from([0.5, 1.0, 1.3, 2.0])), presence=st.sampled_from([-2.0, 0.0, 0.5, 2.0]),
       frequency=st.sampled_from([-2.0, 0.0, 1.0]), repeat_last_n=st.integers(0, 4),
       bias=st.dictionaries(st.integers(0, 7), st.sampled_from([-100.0, -3.0, 0.5, 3.0, 100.0]), max_size=3))
def test_sampler_probabilities_match_a_hand_softmax(logits, history, temperature, top_k, top_p, min_p, rep,
                                                   presence, frequency, repeat_last_n, bias):
    v = len(logits)
    history = [t % v for t in history]
    bias = {t % v: b for t, b in bias.items()}
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
                       presence_penalty=presence, frequency_penalty=frequency, repeat_last_n=repeat_last_n,
                       logit_bias=bias)
    want = reference_probs(logits, history, p)
    got = _sampler_probs(np.array(logits, dtype=np.float32), history, p)
    assert abs(float(got.sum()) - 1.0) < 1e-5
    # float32 against float64: a token at a cut's edge may fall either side, so compare the mass
    # only where both keep a token with a clear margin, and ask that the kept sets nearly agree
    assert np.abs(got - np.array(want)).sum() < 2e-3 or _edge_case(logits, p), (got.tolist(), want)


def _edge_case(logits: list[float], p: SamplingParams) -> bool:
    """A near-tie at a top-k / top-p / min-p boundary, where float32 rounding may decide."""
    probs = sorted(reference_probs(logits, [], SamplingParams(temperature=p.temperature, logit_bias=p.logit_bias)))
    return any(abs(a - b) < 1e-5 for a, b in zip(probs, probs[1:]))


# ---- the rules: one UserError or values the sampler takes ----
@examples(400)
@given(fields=sampling_fields, surface=st.sampled_from([validation.field, validation.flag]))
def test_rules_refuse_or_give_sampler_ready_values(fields, surface):
    try:
        ok = validation.check_sampling(fields, surface, vocab=8, max_context=64)
    except UserError as e:
        msg = str(e)
        assert msg.startswith(surface(e.field)) and "\n" not in msg and msg.endswith(".")
        event(f"refused: {e.field}")
        return
    event("accepted")
    for key, value in ok.items():
        if isinstance(value, float):
            assert math.isfinite(value)
    assert 0 <= ok.get("seed", 0) <= validation.MAX_SEED
    assert all(0 <= t < 8 and -100 <= b <= 100 for t, b in ok.get("logit_bias", {}).items())
    assert all(0 <= t < 8 for t in ok.get("stop_token_ids", []))
    ok.pop("n", None)
    p = SamplingParams(**{"temperature": 1.0, **ok, "top_k": max(ok.get("top_k", 0), 0)}, logprobs=True)
    logits = np.linspace(-3, 3, 8, dtype=np.float32)
    s = sample(logits, [1, 6, 6], p, np.random.default_rng(0))  # 6: a positive logit
    assert 0 <= s.token < 8 and math.isfinite(s.logprob) and len(s.top) == min(p.top_logprobs, 8)
    if not p.greedy:
        with np.errstate(all="ignore"):
            probs = _sampler_probs(logits, [1, 6, 6], p)
        assert np.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5 and (probs >= 0).all()


# ---- the server's parser: a 400 naming a field, or accepted values ----
@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    d = tmp_path_factory.mktemp("fuzz_sampling")
    path = gb.write_gguf(d / "tiny.gguf", gb.tiny_llama(0), gb.gguf_vocab(gb.train_tokenizer()))
    return Runner(Which.GGUF(None, str(path)))


json_values = st.one_of(floats, ints, st.none(), st.booleans(), st.text(max_size=4),
                        st.lists(st.integers(-3, 600), max_size=3))


@examples(300)
@given(body=st.fixed_dictionaries({}, optional={k: st.one_of(json_values, v) for k, v in {
    "temperature": floats, "top_p": floats, "min_p": floats, "top_k": ints, "repetition_penalty": floats,
    "presence_penalty": floats, "frequency_penalty": floats, "repeat_last_n": ints, "seed": ints,
    "max_tokens": ints, "n": ints, "logprobs": ints,
    "logit_bias": st.dictionaries(st.one_of(st.text(max_size=3), ints.map(str)), floats, max_size=4),
    "stop": stop_lists, "stop_token_ids": st.lists(ints, max_size=3)}.items()}))
def test_server_parser_refuses_with_a_field_or_accepts(runner, body):
    from mistralrs_cli.outputs.server.protocol import ApiError, parse_completion

    try:
        parsed = parse_completion({"prompt": [5, 6], **body}, runner.loaded)
    except ApiError as e:
        assert e.status == 400 and e.param in body and e.message.startswith(e.param), (e.param, e.message)
        event(f"400: {e.param}")
        return
    event("accepted")
    for p in parsed.params:
        for name in ("temperature", "presence_penalty", "frequency_penalty"):
            assert math.isfinite(getattr(p, name))
        assert p.seed is None or p.seed >= 0
        assert all(0 <= t < 512 for t in p.logit_bias) and all(0 <= t < 512 for t in p.stop_token_ids)


# ---- a tiny model generates, or one UserError ----
# values the rules accept, their edges included (so most draws generate) ...
valid_fields = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0.0, 1e-300, 1e-7, 0.7, 1.0, 50.0, 1e308]),
    "top_p": st.sampled_from([1e-300, 0.01, 0.5, 1.0]), "min_p": st.sampled_from([0.0, 1e-300, 0.5, 1.0]),
    "top_k": st.sampled_from([-1, 0, 1, 2, 511, 10**9]),
    "repetition_penalty": st.sampled_from([1e-300, 1e-40, 0.5, 1.0, 2.0, 1e308]),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]), "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "repeat_last_n": st.sampled_from([0, 1, 64, 10**9]), "seed": st.sampled_from([0, 7, 2**64 - 1]),
    "max_tokens": st.integers(1, 4), "n": st.integers(1, 3), "top_logprobs": st.integers(0, 20),
    "logit_bias": st.dictionaries(st.integers(0, 511), st.sampled_from([-100.0, -1e-300, 0.0, 5.0, 100.0]),
                                  max_size=5),
    "stop": st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=3), max_size=16),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=4)})
# ... and, half the time, one field replaced by anything (NaN, inf, huge, negative, wrong type)
one_bad = st.one_of(st.none(), st.tuples(st.sampled_from(sorted(SAMPLING_KEYS := [
    "temperature", "top_p", "min_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "repeat_last_n", "seed", "max_tokens", "n", "top_logprobs", "logit_bias", "stop", "stop_token_ids"])),
    st.one_of(floats, ints, bias_maps, stop_lists, st.text(max_size=3))))


@examples(300)
@given(fields=valid_fields, logits=st.lists(st.floats(-30, 30), min_size=8, max_size=8),
       history=st.lists(st.integers(0, 7), max_size=8))
def test_valid_extremes_give_a_distribution(fields, logits, history):
    """Every value the rules accept, edges included (a penalty of 1e-300 divides a logit past
    float32's range), samples from a real distribution: finite, non-negative, summing to 1."""
    fields = {**fields, "logit_bias": {t % 8: b for t, b in fields.get("logit_bias", {}).items()},
              "stop_token_ids": [t % 8 for t in fields.get("stop_token_ids", [])]}
    ok = validation.check_sampling({k: v for k, v in fields.items() if k != "n"}, vocab=8)
    p = SamplingParams(**{**ok, "top_k": max(ok.get("top_k", 0), 0)}, logprobs=True)
    x = np.array(logits, dtype=np.float32)
    s = sample(x, history, p, np.random.default_rng(0))
    assert 0 <= s.token < 8 and math.isfinite(s.logprob)
    if not p.greedy:
        with np.errstate(all="ignore"):
            probs = _sampler_probs(x, history, p)
        assert np.isfinite(probs).all() and (probs >= 0).all() and abs(float(probs.sum()) - 1) < 1e-5
        assert probs[s.token] > 0


@examples(30)
@given(fields=valid_fields, bad=one_bad)
def test_generation_is_valid_or_one_user_error(runner, fields, bad):
    fields = {"max_tokens": 3, **fields, **dict([bad] if bad else [])}
    if isinstance(fields["max_tokens"], int) and fields["max_tokens"] > 4:
        fields["max_tokens"] = 4  # generation length is not what this test explores
    if isinstance(fields.get("n"), int) and fields["n"] > 3:
        fields["n"] = 3
    logprobs = "top_logprobs" in fields
    try:
        out = runner.send_completion_request(CompletionRequest(prompt="the quick", logprobs=logprobs, **fields))
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith(e.field)
        event(f"refused: {e.field}")
        return
    event("generated")
    assert len(out.choices) == fields.get("n", 1)
    for c in out.choices:
        assert c.finish_reason in ("stop", "length") and isinstance(c.text, str)
        for entry in (c.logprobs or {}).get("content", []):  # one per token sampled from the vocabulary
            assert math.isfinite(entry["logprob"]) and entry["logprob"] <= 1e-6
            assert len(entry["top_logprobs"]) == fields["top_logprobs"]
    assert out.usage.completion_tokens <= fields["max_tokens"] * len(out.choices)


# ---- stop strings: the streamed matcher against a naive search ----
def _stream_with_stops(chunks: list[str], stops: list[str]) -> tuple[str, str, bool]:
    """As the engine does: append a chunk, find_stop, send all but the held tail."""
    text, emitted, sent = "", 0, ""
    for chunk in chunks:
        text += chunk
        cut, hold = find_stop(text, emitted, stops)
        if cut is not None:
            return text[:cut], sent + text[emitted:cut] if cut >= emitted else sent, True
        end = len(text) - hold
        if end > emitted:
            sent, emitted = sent + text[emitted:end], end
    return text, sent + text[emitted:], False


def _naive(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """Search the whole text after every chunk; cut at the earliest stop."""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[:min(hits)], True
    return text, False


@examples(600)
@given(chunks=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=25),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=5))
def test_stop_matching_equals_a_naive_search(chunks, stops):
    final, sent, stopped = _stream_with_stops(chunks, stops)
    assert (final, stopped) == _naive(chunks, stops)
    assert sent == final  # what was streamed is exactly the answer: nothing of a stop leaked


def test_stop_matching_time_is_bounded_with_thousands_of_long_stops():
    """4000 stop strings of 4000 characters (what a raised --max-stop-strings/--max-stop-length
    admits): 300 steps of streaming stay far from the old minutes (a generous bound)."""
    import faulthandler
    import time

    rng = np.random.default_rng(0)
    stops = ["".join(rng.choice(list("ab"), 4000)) for _ in range(4000)]
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        t0 = time.monotonic()
        text, emitted = "", 0
        for _ in range(300):
            text += "".join(rng.choice(list("ab"), 3))
            cut, hold = find_stop(text, emitted, stops)
            assert cut is None
            emitted = max(emitted, len(text) - hold)
        assert time.monotonic() - t0 < 60
    finally:
        faulthandler.cancel_dump_traceback_later()
