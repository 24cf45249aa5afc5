"""The grammars tool calls are generated under, checked with llguidance itself on a tiny
tokenizer: a valid call (written by hand) is accepted to the end, a call whose arguments break
the function's schema, or that names another function, is refused."""
from __future__ import annotations

import json

import llguidance as llg
import pytest

from mistralrs_cli.tools import fallback, grammars
from mistralrs_cli.tools.spec import parse_tools
from mistralrs_cli.types import Grammar
from tiny_models import train_tokenizer

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"$ref": "#/$defs/zone"}}, "required": ["tz"],
             "$defs": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}]


@pytest.fixture(scope="module")
def lltok():
    return llg.LLTokenizer(train_tokenizer().to_str(), eos_token=1)


def accepts(lltok, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes text token by token and may end there."""
    source = llg.grammar_from(grammar.kind, grammar.value)
    m = llg.LLMatcher(lltok, source, log_level=0)
    assert not m.is_error(), m.get_error()
    return m.consume_tokens(lltok.tokenize_str(text)) and m.is_accepting()


def no_special(_text: str):
    return None


def test_hermes_required(lltok):
    g = grammars.hermes_grammar(parse_tools(TOOLS, "required"), no_special)
    ok = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
    assert accepts(lltok, g, ok)
    two = ok + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    assert accepts(lltok, g, two)
    for bad in ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 9}}\n</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
                '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>',
                "Sure, here is the weather."):
        assert not accepts(lltok, g, bad), bad


def test_hermes_named_and_not_parallel(lltok):
    req = parse_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, False)
    g = grammars.hermes_grammar(req, no_special)
    one = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    assert accepts(lltok, g, one) and not accepts(lltok, g, one + "\n" + one)
    assert not accepts(lltok, g, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')


def test_special_token_markers(lltok):
    """A marker that is one special token in the vocabulary is that token, not its spelling."""
    g = grammars.mistral_grammar(parse_tools(TOOLS, "required"), lambda t: 1 if t == "[TOOL_CALLS]" else None)
    m = llg.LLMatcher(lltok, llg.grammar_from(g.kind, g.value), log_level=0)
    assert m.consume_token(1)
    assert m.consume_tokens(lltok.tokenize_str('[{"name": "get_time", "arguments": {"tz": "UTC"}}]'))
    assert m.is_accepting()
    assert not accepts(lltok, g, '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}}]')


def test_llama3_required(lltok):
    g = grammars.llama3_grammar(parse_tools(TOOLS, "required"))
    assert accepts(lltok, g, '{"name": "get_time", "parameters": {"tz": "UTC"}}')
    assert not accepts(lltok, g, '{"name": "get_time", "arguments": {"tz": "UTC"}}')


def test_fallback_choices(lltok):
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    reply = '{"content": "Hello!"}'
    auto, required = (fallback.grammar(parse_tools(TOOLS, c)) for c in ("auto", "required"))
    assert accepts(lltok, auto, call) and accepts(lltok, auto, reply)
    assert accepts(lltok, required, call) and not accepts(lltok, required, reply)
    assert not accepts(lltok, required, '{"tool_calls": []}')
    single = fallback.grammar(parse_tools(TOOLS, "required", False))
    assert not accepts(lltok, single, call[:-2] + ', {"name": "get_time", "arguments": {"tz": "UTC"}}]}')
    schema = json.loads(required.value)  # the schema the grammar is: JSON a validator reads too
    assert schema["properties"]["tool_calls"]["minItems"] == 1 and "$defs" in schema


def test_fallback_system_message():
    req = parse_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    msgs = fallback.with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], req)
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '"name": "get_time"' in msgs[0]["content"] and "Call the function get_time" in msgs[0]["content"]
    assert fallback.with_tools([{"role": "user", "content": "hi"}], req)[0]["role"] == "system"


HERMES_OK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
HERMES_BAD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def test_hermes_auto_call_or_reply(lltok):
    """"auto": a valid call, or a reply with no <tool_call> in it; never an invalid call, an
    empty answer, or text with a call in it (which the splitter would read as a call)."""
    g = grammars.hermes_grammar(parse_tools(TOOLS, "auto"), no_special)
    assert accepts(lltok, g, HERMES_OK) and accepts(lltok, g, "Sure, it is sunny in Oslo.\n\nBye")
    assert accepts(lltok, g, "a </tool_call> b < tool_call>")
    for bad in (HERMES_BAD, "", "Let me check. " + HERMES_OK, "Let me check <tool_call> now",
                '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'):
        assert not accepts(lltok, g, bad), bad


def test_llama3_auto_call_or_reply(lltok):
    g = grammars.llama3_grammar(parse_tools(TOOLS, "auto"))
    assert g.kind == "lark"
    assert accepts(lltok, g, '{"name": "get_time", "parameters": {"tz": "UTC"}}')
    assert accepts(lltok, g, "It is noon. {braces} later are text.")
    for bad in ('{"name": "get_time", "parameters": {"tz": "EST"}}', ' \n{"a": 1}', "<|python_tag|>hi", ""):
        assert not accepts(lltok, g, bad), bad


def test_mistral_auto_call_or_reply(lltok):
    g = grammars.mistral_grammar(parse_tools(TOOLS, "auto"), no_special)
    assert accepts(lltok, g, '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "CET"}}]')
    assert accepts(lltok, g, "No tool needed [TOOL CALLS].")
    for bad in ('[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "EST"}}]', "ok [TOOL_CALLS]"):
        assert not accepts(lltok, g, bad), bad
    # the marker as a special token (id 0 here): the token starts a call, plain text still a reply
    special = grammars.mistral_grammar(parse_tools(TOOLS, "auto"), lambda t: 0 if t == "[TOOL_CALLS]" else None)
    m = llg.LLMatcher(lltok, llg.grammar_from(special.kind, special.value), log_level=0)
    assert m.consume_token(0)
    assert m.consume_tokens(lltok.tokenize_str('[{"name": "get_time", "arguments": {"tz": "UTC"}}]'))
    assert m.is_accepting() and accepts(lltok, special, "Just text.")
    assert not accepts(lltok, special, "spelled [TOOL_CALLS] in text")  # the splitter would read it
    m = llg.LLMatcher(lltok, llg.grammar_from(special.kind, special.value), log_level=0)
    assert m.consume_token(0) and not m.consume_tokens(lltok.tokenize_str('[{"name": "get_time", "arguments": {}}]'))
