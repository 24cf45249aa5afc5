"""Tool calling through the Python API (Runner.send_chat_completion_request): the same fields
and the same code path as the server (tools/plan.py), on SmolLM2 through the JSON fallback."""
from __future__ import annotations

import json

import jsonschema
import pytest

from mistralrs_cli.api import ChatCompletionRequest, Runner, Which
from mistralrs_cli.validation import ParamError
from test_tools_server import ASK, SCHEMAS, TOOLS


@pytest.fixture(scope="module")
def runner(smollm2_path):
    return Runner(Which.GGUF(None, str(smollm2_path)))


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 80, **kw})


def test_required_call_validates(runner):
    r = runner.send_chat_completion_request(request(tool_choice="required", parallel_tool_calls=False))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_stream_reassembles(runner):
    kw = dict(tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = runner.send_chat_completion_request(request(**kw)).choices[0]
    calls, finish = {}, None
    for chunk in runner.send_chat_completion_request(request(stream=True, **kw)):
        c = chunk.choices[0]
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            entry = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            entry["name"] += d.get("function", {}).get("name", "")
            entry["arguments"] += d.get("function", {}).get("arguments", "")
    want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in whole.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == want and finish == whole.finish_reason == "tool_calls"


def test_tool_result_goes_back(runner):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    r = runner.send_chat_completion_request(request(messages=msgs, tool_choice="none", max_tokens=20))
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("kw,field", [
    ({"tool_choice": {"type": "function", "function": {"name": "absent"}}}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_bad_fields(runner, kw, field):
    with pytest.raises(ParamError) as e:
        runner.send_chat_completion_request(request(**kw))
    assert e.value.field == field
