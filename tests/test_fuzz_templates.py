"""Fuzz of chat templates: random compositions of jinja constructs (loops, ifs, recursive macros,
set, operators, filters, methods, long strings) over a conversation with tool calls. Each render
gives a string within the size limit or one TemplateError line naming the template's source,
within BOUND_S (signal.alarm), under a 1 s render budget. Seeded (derandomize) and short; run it
longer by hand with e.g. MISTRALRS_FUZZ_EXAMPLES=20000.
"""
from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralrs_cli.loaders.chat_template import ChatTemplate, TemplateError
from mistralrs_cli.loaders.template_budget import TemplateLimits
from test_template_hostile import BOUND_S, ORIGIN, TOOLS, alarm, conversation, one_line

FUZZ_EXAMPLES = int(os.environ.get("MISTRALRS_FUZZ_EXAMPLES", "600"))  # ~30 s here
FUZZ_SECONDS = 1  # the render budget while fuzzing, so runaway examples cost a second, not five
INTS = st.sampled_from(["0", "1", "2", "7", "-3", "100", "100000", "10**9", "10**10", "2**64"])
STRS = st.sampled_from(["'x'", "'ab\\n'", "''", "'%s%s'", "'{}{}'", "'\\t'", "bos_token", "('y' * 100000)"])
DATA = st.sampled_from(["messages", "messages[0]", "messages[0]['content']", "messages[-1].role",
                        "ns.v", "range(5)", "tools", "[1, 'a']", "{'k': 'v'}",
                        "messages|map(attribute='content')"])
FILTERS = st.sampled_from([
    "center({i})", "indent({i})", "join({s})", "replace({s}, {s})", "list", "string", "length",
    "upper", "tojson(indent={i})", "batch({i}, {s})", "slice({i})", "sum", "wordwrap({i})",
    "truncate({i})", "first", "last", "reverse", "unique", "sort", "default({s})", "int", "trim",
    "format({s}, {s})", "items", "dictsort", "selectattr('role')", "map('string')", "urlize({i}, true, {s})",
    "sum(start=[{s}])", "tojson(separators=({s}, {s}))", "round({i})", "pprint", "center({i})|list"])


def _expressions() -> st.SearchStrategy[str]:
    def grow(inner):
        binop = st.tuples(inner, st.sampled_from(["*", "**", "+", "~", "%", "//", "-"]), inner)
        return st.one_of(
            binop.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, FILTERS, INTS, STRS).map(
                lambda t: f"({t[0]})|" + t[1].format(i=t[2], s=t[3])),
            st.tuples(inner, st.sampled_from(["ljust", "center", "zfill", "expandtabs"]), INTS).map(
                lambda t: f"({t[0]}|string).{t[1]}({t[2]})"),
            st.tuples(STRS, inner, inner).map(lambda t: f"{t[0]}.format({t[1]}, {t[2]})"),
            st.tuples(inner, inner).map(lambda t: f"[{t[0]}, {t[1]}]"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
            inner.map(lambda e: f"({e})[1:]"),
            INTS.map(lambda i: f"range({i})"),
            INTS.map(lambda i: f"lipsum({i})"))
    return st.recursive(st.one_of(INTS, STRS, DATA), grow, max_leaves=6)


def _statements() -> st.SearchStrategy[str]:
    expr = _expressions()

    def grow(body):
        return st.one_of(
            st.tuples(expr, body).map(lambda t: f"{{% for x in {t[0]} %}}{t[1]}{{{{ x }}}}{{% endfor %}}"),
            st.tuples(expr, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% endif %}}"),
            st.tuples(body, st.booleans()).map(
                lambda t: f"{{% macro f(n) %}}{t[0]}{{{{ f(n + 1) }}}}{'{{ f(n) }}' if t[1] else ''}"
                          f"{{% endmacro %}}{{{{ f(0) }}}}"),
            st.lists(body, min_size=2, max_size=3).map("".join))
    leaf = st.one_of(expr.map(lambda e: f"{{{{ {e} }}}}"), expr.map(lambda e: f"{{% set ns.v = {e} %}}"),
                     st.sampled_from(["text", "{{ raise_exception('no') }}", "{% break %}"]))
    return st.recursive(leaf, grow, max_leaves=5)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=_statements())
def test_fuzz_templates_end_in_a_string_or_one_line(body):
    source = "{% set ns = namespace(v='x') %}" + body
    old = os.environ.get("MISTRALRS_TEMPLATE_SECONDS")
    os.environ["MISTRALRS_TEMPLATE_SECONDS"] = str(FUZZ_SECONDS)
    start = time.monotonic()
    try:
        with alarm(BOUND_S):
            out = ChatTemplate(source, ORIGIN).render(conversation(6, tool_calls=True), tools=TOOLS)
        assert isinstance(out, str) and len(out) <= TemplateLimits().max_chars
    except TemplateError as e:
        assert one_line(e).startswith(f"The chat template from {ORIGIN} "), str(e)
    finally:
        os.environ.pop("MISTRALRS_TEMPLATE_SECONDS")
        if old is not None:
            os.environ["MISTRALRS_TEMPLATE_SECONDS"] = old
    assert time.monotonic() - start < BOUND_S, source
