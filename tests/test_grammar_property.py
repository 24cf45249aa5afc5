"""Validity as a property (hypothesis): on SmolLM2 at temperature 1, generated JSON schemas
(nested objects, arrays with min/max items, enums, patterns, numbers with bounds, required and
optional properties, additionalProperties false) and generated regexes. Every output the engine
finishes with "stop" parses and validates under jsonschema, or fully matches under Python's re:
both judges are independent of llguidance.

Each hypothesis example is a batch of requests run together through one engine (continuous
batching, each sequence its own grammar), with a small max_tokens so the property test takes
about a minute; outputs cut by max_tokens ("length") are not judged, but most must finish.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralrs_cli.api import Runner, Which
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import EngineConfig, Grammar, SamplingParams

BATCH, EXAMPLES = 50, 4  # 200 schemas, 100 regexes (2 examples of 50)
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# ---- regexes: a subset on which Rust's regex crate (llguidance) and Python's re agree ----
_LITERALS = "abcxyz0129 -,:"
_CLASSES = ["[a-z]", "[0-9]", "[A-Z]", "[a-c]", r"\d", "[xyz]", "[a-f0-9]"]


@st.composite
def _quantifier(draw) -> str:
    n = draw(st.integers(1, 3))
    return draw(st.sampled_from(["", "", "?", f"{{{n}}}", f"{{{n},{n + draw(st.integers(1, 3))}}}", "+"]))


_word = st.text(alphabet="abcxyz019", min_size=1, max_size=3)
_atom = st.one_of(st.sampled_from(list(_LITERALS)), st.sampled_from(_CLASSES),
                  st.lists(_word, min_size=2, max_size=3, unique=True).map(lambda ws: "(?:" + "|".join(ws) + ")"))
regexes = st.lists(st.tuples(_atom, _quantifier()).map("".join), min_size=1, max_size=5).map("".join)

# ---- JSON schemas ----
_names = st.sampled_from(["id", "name", "age", "tags", "score", "kind", "items", "ok", "city", "note"])
_scalar = st.one_of(st.text(alphabet="abc xyz", max_size=5), st.integers(-5, 5), st.booleans(), st.none())


@st.composite
def _integer(draw) -> dict:
    lo, span = draw(st.integers(-1000, 1000)), draw(st.integers(0, 1000))
    s = {"type": "integer", "minimum": lo, "maximum": lo + span}
    if draw(st.booleans()):
        s["exclusiveMinimum"] = s.pop("minimum")
        s["maximum"] += 1
    return s


@st.composite
def _number(draw) -> dict:
    lo = draw(st.integers(-100, 100)) / 4
    return {"type": "number", "minimum": lo, "maximum": lo + draw(st.integers(1, 400)) / 4}


@st.composite
def _string(draw) -> dict:
    lo = draw(st.integers(0, 3))
    return {"type": "string", "minLength": lo, "maxLength": lo + draw(st.integers(0, 8))}


_leaf = st.one_of(
    _integer(), _number(), _string(),
    regexes.map(lambda r: {"type": "string", "pattern": f"^{r}$"}),
    st.lists(_scalar, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
    st.just({"type": "boolean"}), st.just({"type": "null"}),
)


@st.composite
def _array(draw, items) -> dict:
    lo = draw(st.integers(0, 2))
    return {"type": "array", "items": draw(items), "minItems": lo, "maxItems": lo + draw(st.integers(0, 2))}


@st.composite
def _object(draw, values) -> dict:
    props = draw(st.dictionaries(_names, values, min_size=1, max_size=4))
    required = [k for k in props if draw(st.booleans())]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


schemas = st.recursive(_leaf, lambda inner: st.one_of(_array(inner), _object(inner)), max_leaves=6)
top_schemas = st.one_of(_object(schemas), schemas)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    loaded = Runner(Which.GGUF(None, str(smollm2_path)), token_source="none").loaded
    e = Engine(loaded, EngineConfig(max_seqs=BATCH, block_size=16))
    e.prompt = chat_ids(loaded, [{"role": "user", "content": "Answer in the requested format."}])
    return e


def batch(engine: Engine, grammars: list[Grammar], max_tokens: int) -> list[tuple[str, str]]:
    """All requests at once, temperature 1, stepped to the end: (text, finish_reason) each."""
    reqs = [engine.add_request(engine.prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                                             grammar=g)) for i, g in enumerate(grammars)]
    texts = {r.id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            texts[o.request_id].append(o.text)
    return [("".join(texts[r.id]), r.finish_reason) for r in reqs]


@settings(**SETTINGS)
@given(st.lists(top_schemas, min_size=BATCH, max_size=BATCH))
def test_every_finished_output_validates_against_its_schema(engine, batch_schemas):
    outs = batch(engine, [Grammar("json_schema", json.dumps(s)) for s in batch_schemas], max_tokens=48)
    finished = 0
    for schema, (text, reason) in zip(batch_schemas, outs):
        assert reason in ("stop", "length"), (schema, text, reason)
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= BATCH // 2  # the property is checked on most of them


@settings(**{**SETTINGS, "max_examples": 2})
@given(st.lists(regexes, min_size=BATCH, max_size=BATCH))
def test_every_finished_output_fully_matches_its_regex(engine, batch_regexes):
    outs = batch(engine, [Grammar("regex", r) for r in batch_regexes], max_tokens=24)
    finished = 0
    for rx, (text, reason) in zip(batch_regexes, outs):
        assert reason in ("stop", "length"), (rx, text, reason)
        if reason == "stop":
            assert re.fullmatch(rx, text), (rx, text)
            finished += 1
    assert finished >= BATCH // 2
