"""Tool calling without a model: the request fields' checks, tool messages, and splitting
hand-written outputs of each format into reply text and calls (expected values written by hand),
streamed in pieces or whole."""
from __future__ import annotations

import json

import pytest

from mistralrs_cli.tools import fallback, formats
from mistralrs_cli.tools.calls import ToolCall
from mistralrs_cli.tools.incremental import ArgsDelta, CallStart
from mistralrs_cli.tools.messages import for_plain_template, tool_fields
from mistralrs_cli.tools.spec import parse_tools
from mistralrs_cli.validation import ParamError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def split(splitter, pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    """Feed pieces, then finish: (reply text, [(name, arguments as an object)]). A call comes
    whole (ToolCall) or streamed: CallStart, then its arguments in ArgsDelta fragments."""
    events = [e for p in pieces for e in splitter.feed(p)] + splitter.finish()
    text, calls = "", []
    for e in events:
        if isinstance(e, str):
            text += e
        elif isinstance(e, (ToolCall, CallStart)):
            calls.append([e.id, e.name, getattr(e, "arguments", "")])
        else:
            assert isinstance(e, ArgsDelta) and calls
            calls[-1][2] += e.text
    for cid, _, _ in calls:
        assert cid.startswith("call_") and len(cid) > 10
    return text, [(name, json.loads(args)) for _, name, args in calls]


def both_ways(fmt: str, text: str):
    """The whole text at once and one character at a time must give the same answer."""
    make = fallback.FallbackSplitter if fmt == "fallback" else formats.FORMATS[fmt].splitter
    whole = split(make(), [text])
    assert split(make(), list(text)) == whole
    return whole


HERMES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>',
     "Let me look.", [("a", {}), ("b", {"x": [1, 2]})]),
    ("No tools needed: 2 < 3 and <tool is a word.\n", "No tools needed: 2 < 3 and <tool is a word.\n", []),
    ('<tool_call>\n{"name": broken}\n</tool_call>', '<tool_call>\n{"name": broken}\n</tool_call>', []),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"k\\": 1}"}\n</tool_call>', "", [("f", {"k": 1})]),
    ('Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}}', "Hi", [("f", {"a": 1})]),  # unclosed at EOS
]


@pytest.mark.parametrize("text,content,calls", HERMES)
def test_hermes(text, content, calls):
    assert both_ways("hermes", text) == (content, calls)


LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "f", "parameters": {"n": 3}}', "", [("f", {"n": 3})]),
    (' {"name": "f", "arguments": {}}; {"name": "g", "parameters": {"q": "x"}}', "", [("f", {}), ("g", {"q": "x"})]),
    ("The answer is {not json}", "The answer is {not json}", []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA3)
def test_llama3(text, content, calls):
    assert both_ways("llama3", text) == (content, calls)


MISTRAL = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]', "", [("get_weather", {"city": "Rome"})]),
    ('Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
     "Sure.", [("a", {"x": 1}), ("b", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Bern"}[TOOL_CALLS]f[ARGS]{}', "",
     [("get_weather", {"city": "Bern"}), ("f", {})]),
    ("Just text [TOOL", "Just text [TOOL", []),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL)
def test_mistral(text, content, calls):
    assert both_ways("mistral", text) == (content, calls)


FALLBACK = [
    ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Lima"}}]}', "", [("get_weather", {"city": "Lima"})]),
    ('{"content": "Hello \\"there\\"\\n\\u00e9\\ud83d\\ude00 \\\\ done"}', 'Hello "there"\né😀 \\ done', []),
    ('{"content": "cut sho', "cut sho", []),  # max_tokens ended it: what there was
    ("not json at all", "not json at all", []),
]


@pytest.mark.parametrize("text,content,calls", FALLBACK)
def test_fallback(text, content, calls):
    assert both_ways("fallback", text) == (content, calls)


def test_fallback_reply_streams_as_written():
    s = fallback.FallbackSplitter()
    assert s.feed('{"content": "Hel') == ["Hel"] and s.feed('lo \\u00') == ["lo "] and s.feed('e9!"}') == ["é!"]
    assert s.finish() == []


def test_calls_stream_as_written():
    """A call is announced once its name is complete; its arguments follow as they are written."""
    for s, head in ((formats.FORMATS["hermes"].splitter(), "<tool_call>\n"),
                    (fallback.FallbackSplitter(), '{"tool_calls": [')):
        assert s.feed(head + '{"name": "get_weather", "argu') == []
        start, first = s.feed('ments": {"ci')
        assert isinstance(start, CallStart) and start.name == "get_weather" and first == ArgsDelta('{"ci')
        assert s.feed('ty": "Paris"}}') == [ArgsDelta('ty": "Paris"}')]
        assert s.feed("\n</tool_call>" if head.startswith("<") else "]}") == [] and s.finish() == []


def test_format_detection():
    assert formats.detect("{{ '<tool_call>' }}{% for t in tools %}").name == "hermes"
    assert formats.detect("[AVAILABLE_TOOLS] {{ tools|tojson }} [TOOL_CALLS]").name == "mistral"
    assert formats.detect("<|start_header_id|>ipython<|end_header_id|>{{ '<|python_tag|>' }}").name == "llama3"


# ---- the request fields ----
def test_parse_tools_defaults_and_choices():
    req = parse_tools([WEATHER])
    assert req.choice == "auto" and req.parallel and [f.name for f in req.functions] == ["get_weather"]
    named = parse_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False)
    assert named.choice == "function" and named.name == "get_weather" and not named.parallel
    assert parse_tools(None) is None and parse_tools([WEATHER], "none").active is False
    bare = parse_tools([{"type": "function", "function": {"name": "now"}}])
    assert bare.functions[0].parameters["type"] == "object"


BAD = [
    (("not a list",), "tools"),
    (([{"type": "function"}],), "tools[0]"),
    (([{"type": "retrieval", "function": {"name": "x"}}],), "tools[0]"),
    (([{"type": "function", "function": {"name": "has space"}}],), "tools[0].function.name"),
    (([{"type": "function", "function": {"name": "f", "parameters": "{}"}}],), "tools[0].function.parameters"),
    (([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],),
     "tools[0].function.parameters"),
    (([WEATHER, WEATHER],), "tools[1].function.name"),
    (([WEATHER], "sometimes"), "tool_choice"),
    (([WEATHER], {"type": "function", "function": {"name": "absent"}}), "tool_choice"),
    ((None, "required"), "tool_choice"),
    (([WEATHER], "auto", "yes"), "parallel_tool_calls"),
]


@pytest.mark.parametrize("args,field", BAD)
def test_parse_tools_refuses(args, field):
    with pytest.raises(ParamError) as e:
        parse_tools(*args)
    assert e.value.field == field and field.split("[")[0].split(".")[0] in str(e.value)


# ---- messages ----
def test_tool_messages_for_templates():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert tool_fields({"role": "assistant", "tool_calls": [call]}, 1) == {
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert tool_fields({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, 2) == {"tool_call_id": "call_1"}
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "tool_calls": [call]},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}):
        with pytest.raises(ParamError):
            tool_fields(bad, 0)
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "thanks"}]
    assert for_plain_template(msgs) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'},
        {"role": "user", "content": '{"tool_response": {"tool_call_id": "call_1", "name": "get_weather", '
                                    '"content": "sunny"}}\n\nthanks'}]


# ---- properties: built texts split back into what they were built from, in any chunking ----
from hypothesis import given, settings, strategies as st  # noqa: E402

_args = st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8), st.booleans()), max_size=3)
_calls = st.lists(st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _args), max_size=3)


def _chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=150, deadline=None)
@given(content=st.text(max_size=30), calls=_calls, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_hermes_property(content, calls, cuts):
    if "<tool_call>" in content or not content.strip() and not calls:
        return
    blocks = [f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in calls]
    text = content + ("\n" + "\n".join(blocks) if calls else "")
    want_content = content.rstrip() if calls else content
    assert split(formats.FORMATS["hermes"].splitter(), _chunked(text, cuts)) == (want_content, calls)


@settings(max_examples=150, deadline=None)
@given(content=st.text(max_size=40), ascii_only=st.booleans(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_fallback_content_property(content, ascii_only, cuts):
    text = json.dumps({"content": content}, ensure_ascii=ascii_only)
    assert split(fallback.FallbackSplitter(), _chunked(text, cuts)) == (content, [])
