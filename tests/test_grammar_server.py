"""Structured output through the server with the official openai client, and the Python API.

response_format (json_object, json_schema) and mistral.rs's grammar field (extra_body), on chat
and completions, streamed and not, n > 1: every choice that finishes with "stop" validates
(jsonschema) or fully matches (re.fullmatch). Bad grammars are 400s in OpenAI's shape naming the
field, and the server keeps serving. The Python API takes the same fields.
"""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from mistralrs_cli.api import ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_cli.validation import ParamError
from test_server import serve

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def runner(smollm2_path):
    return Runner(Which.GGUF(None, str(smollm2_path)), token_source="none")


@pytest.fixture(scope="module")
def srv(runner):
    with serve(runner.loaded) as s:
        yield s


def streamed(stream) -> dict[int, tuple[str, str]]:
    """choice index -> (text, finish_reason) from a chat or completion stream."""
    text: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text[c.index] = text.get(c.index, "") + (piece or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return {i: (text[i], reasons[i]) for i in text}


def test_response_format_json_schema_and_json_object(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = srv.client.chat.completions.create(model="m", messages=MSGS, response_format=fmt, n=3, temperature=1.0,
                                           seed=3, max_tokens=60)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    s = srv.client.completions.create(model="m", prompt="A JSON object describing a cat:", n=2, temperature=1.0,
                                      seed=4, max_tokens=60, stream=True, extra_body={"response_format": {
                                          "type": "json_object"}})
    outs = streamed(s)
    assert len(outs) == 2
    for text, reason in outs.values():
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("grammar, judge", [
    ({"type": "regex", "value": r"[A-Z][a-z]{2,8} [0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t)),
    ({"type": "yacc", "value": 'start: "red" | "green" | "blue"'}, lambda t: t in ("red", "green", "blue")),
    ({"type": "json_schema", "value": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_grammar_field_on_chat_and_completions_streamed_or_not(srv, grammar, judge):
    chat = srv.client.chat.completions.create(model="m", messages=MSGS, n=2, temperature=1.0, seed=1, max_tokens=40,
                                              extra_body={"grammar": grammar})
    comp = srv.client.completions.create(model="m", prompt="Name and age:", n=2, temperature=1.0, seed=2,
                                         max_tokens=40, extra_body={"grammar": grammar}, stream=True)
    outs = [(c.message.content, c.finish_reason) for c in chat.choices] + list(streamed(comp).values())
    assert sum(reason == "stop" for _, reason in outs) >= 3
    for text, reason in outs:
        if reason == "stop":
            assert judge(text), text


@pytest.mark.parametrize("body, param, says", [
    ({"grammar": {"type": "regex", "value": "[a-"}}, "grammar", "not a valid regex"),
    ({"grammar": {"type": "lark", "value": "start: x("}}, "grammar", "not a valid Lark grammar"),
    ({"grammar": {"type": "regex", "value": "[a&&b]"}}, "grammar", "no token can start it"),
    ({"grammar": {"type": "cfg", "value": "x"}}, "grammar", "grammar.type"),
    ({"grammar": "abc"}, "grammar", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                        "if": {}}}}},
     "response_format", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ({"response_format": {"type": "json_object"}, "grammar": {"type": "regex", "value": "a"}}, "grammar", "not both"),
])
def test_bad_grammars_are_400s_naming_the_field(srv, body, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=5, extra_body=body)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and says in err["message"], err
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    ok = srv.client.chat.completions.create(model="m", messages=MSGS, max_tokens=3)  # still serving
    assert ok.choices[0].message.content is not None


def test_python_api_fields(runner):
    r = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=MSGS, max_tokens=60, temperature=1.0, seed=5, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}))
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    r = runner.send_completion_request(CompletionRequest(prompt="A number:", max_tokens=10, temperature=0.0,
                                                         grammar="[0-9]{4}", grammar_type="regex"))
    assert re.fullmatch("[0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    with pytest.raises(ParamError) as e:
        runner.send_completion_request(CompletionRequest(prompt="x", grammar={"type": "lark", "value": "start: ("}))
    assert e.value.field == "grammar" and "not a valid Lark grammar" in str(e.value)
