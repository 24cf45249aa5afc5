"""Hostile chat templates (from -c/--chat-template, tokenizer_config.json or a GGUF's
tokenizer.chat_template) end quickly with one clear line, and real templates render exactly as a
plain jinja2 ImmutableSandboxedEnvironment renders them.

Every hang is guarded by signal.alarm (in-process renders) or a subprocess timeout (CLI runs), so a
regression fails instead of hanging the suite. The fuzz at the end is seeded (derandomize) and
short; run it longer by hand with e.g. MISTRALRS_FUZZ_EXAMPLES=20000.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

import gguf_builder as gb
import test_chat_template as known
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.builtin_templates import TEMPLATE_DIR
from mistralrs_cli.loaders.chat_template import ChatTemplate, TemplateError
from mistralrs_cli.loaders.template_sandbox import TemplateLimits

MISTRALRS = Path(sys.executable).with_name("mistralrs")
FIXTURES = Path(__file__).parent / "fixtures" / "templates"
ORIGIN = "GGUF tokenizer.chat_template"
HI = [{"role": "user", "content": "hi"}]
BOUND_S = 20  # a hostile render must end well within this, on this slow shared machine

# name -> (template, what the error line must say)
HOSTILE = {
    "nested-range": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                     "MISTRALRS_TEMPLATE_ITERATIONS"),
    "nested-range-empty-body": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                "{% endfor %}", "MISTRALRS_TEMPLATE_ITERATIONS"),
    "string-times-10**10": ("{{ 'x' * 10**10 }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "7**100000000": ("{{ 7**100000000 }}", "MISTRALRS_TEMPLATE_INT_BITS"),
    "recursive-macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    "recursive-loop": ("{% for m in [messages] recursive %}{{ loop([m]) }}{% endfor %}", "recursed too deeply"),
    "forking-macro": ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                      "{{ f(0) }}", "MISTRALRS_TEMPLATE_SECONDS"),
    "huge-output": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "huge-macro-output": ("{% macro f() %}{% for i in range(100000) %}{{ messages }}{{ 'y' * 1000 }}"
                          "{% endfor %}{% endmacro %}{{ f() }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "doubling-tilde": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "doubling-plus": ("{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "many-references": ("{% set b = 'x' * 8000000 %}{{ [b, b, b, b, b, b, b, b, b, b] }}",
                        "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "join-references": ("{% set b = 'x' * 8000000 %}{{ [b, b, b, b, b, b, b, b, b, b]|join }}",
                        "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "center-filter": ("{{ 'x'|center(10000000000) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "ljust-method": ("{{ 'x'.ljust(10000000000) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "to-bytes": ("{{ (1).to_bytes(1000000000, 'big') }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "printf-width": ("{{ '%9999999999s' % 'x' }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "printf-star": ("{{ '%*s' % (999999999, 'x') }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "format-width": ("{{ '{:>9999999999}'.format(1) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "format-repeats": ("{% set b = 'x' * 4000000 %}{{ ('{0}' * 20).format(b) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "replace-empty": ("{% set b = 'x' * 100000 %}{{ b|replace('', b) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(100) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "indent": ("{{ ('x\n' * 1000000)|indent(1000) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "lipsum": ("{{ lipsum(1000000) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "slice": ("{{ []|slice(1000000000)|list }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "sum-of-lists": ("{{ ([[1]] * 1000000)|sum(start=[]) }}", "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "tojson-deep-indent": ("{% set ns = namespace(l=[0] * 1000000) %}{% for i in range(900) %}"
                           "{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|tojson(indent=100) }}",
                           "MISTRALRS_TEMPLATE_MAX_CHARS"),
    "int-squaring": ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                     "{% endfor %}{{ ns.n }}", "MISTRALRS_TEMPLATE_INT_BITS"),
    "messages-loops": ("{% for a in messages %}{% for b in messages %}{% for c in messages %}"
                       "{% for d in messages %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
                       "MISTRALRS_TEMPLATE_ITERATIONS"),
}
COMPILE_ERRORS = {  # refused when the template is read, before any message
    "deep-parentheses": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "deep-blocks": "{% for m in messages %}" * 30 + "x" + "{% endfor %}" * 30,
    "huge-source": "x" * (2**20 + 1),
}


class Hung(Exception):
    pass


@contextmanager
def alarm(seconds: int):
    """Fail (not hang) when the body runs past `seconds`."""
    def ring(*_):
        raise Hung(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---- every hostile case through the render function --------------------------------------------

@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_render_ends_with_one_line(name):
    source, says = HOSTILE[name]
    # 200 messages make the quadruple loop over messages 1.6e9 iterations
    messages = HI * 200 if name == "messages-loops" else HI
    start = time.monotonic()
    with alarm(BOUND_S), pytest.raises(TemplateError) as e:
        ChatTemplate(source, ORIGIN).render(messages)
    assert time.monotonic() - start < BOUND_S
    line = one_line(e.value)
    assert line.startswith(f"The chat template from {ORIGIN} "), line
    assert says in line and "--chat-template" in line, line


@pytest.mark.parametrize("name", sorted(COMPILE_ERRORS))
def test_uncompilable_template_is_one_line(name):
    with alarm(BOUND_S), pytest.raises(TemplateError) as e:
        ChatTemplate(COMPILE_ERRORS[name], ORIGIN)
    line = one_line(e.value)
    assert ORIGIN in line and "--chat-template" in line, line


def test_limits_are_raised_by_environment(monkeypatch):
    # 2,000 ranges of 1,000 items, each item also looped over: 4,004,000 counted
    loops = "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok"
    with pytest.raises(TemplateError, match="MISTRALRS_TEMPLATE_ITERATIONS"):
        ChatTemplate(loops, ORIGIN).render(HI)
    monkeypatch.setenv("MISTRALRS_TEMPLATE_ITERATIONS", "4004000")
    assert ChatTemplate(loops, ORIGIN).render(HI) == "ok"
    monkeypatch.setenv("MISTRALRS_TEMPLATE_ITERATIONS", "4003999")
    with pytest.raises(TemplateError, match="MISTRALRS_TEMPLATE_ITERATIONS"):
        ChatTemplate(loops, ORIGIN).render(HI)
    monkeypatch.delenv("MISTRALRS_TEMPLATE_ITERATIONS")
    big = "{{ 'x' * 9000000 }}"  # just over the default 8 Mi characters
    with pytest.raises(TemplateError, match="MISTRALRS_TEMPLATE_MAX_CHARS"):
        ChatTemplate(big, ORIGIN).render(HI)
    monkeypatch.setenv("MISTRALRS_TEMPLATE_MAX_CHARS", str(16 * 2**20))
    assert len(ChatTemplate(big, ORIGIN).render(HI)) == 9_000_000
    monkeypatch.setenv("MISTRALRS_TEMPLATE_SECONDS", "0.2")
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r"within 0.2 s.*MISTRALRS_TEMPLATE_SECONDS"):
        ChatTemplate(HOSTILE["forking-macro"][0], ORIGIN).render(HI)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "lots"])
def test_bad_limit_variable_is_one_line(monkeypatch, value):
    monkeypatch.setenv("MISTRALRS_TEMPLATE_SECONDS", value)
    with pytest.raises(UserError, match=f"MISTRALRS_TEMPLATE_SECONDS={value!r}"):
        ChatTemplate("{{ 'x' }}", ORIGIN).render(HI)


def test_defaults_are_the_documented_ones():
    assert TemplateLimits() == TemplateLimits(seconds=5.0, max_chars=8 * 2**20, iterations=1_000_000,
                                              int_bits=65536)


def test_legitimate_near_limit_values_render():
    # a 7 Mi-character message (about 2M tokens) through ChatML: under every default limit
    content = "word " * (7 * 2**20 // 5)
    out = ChatTemplate(known.SMOLLM2, ORIGIN).render([{"role": "user", "content": content}])
    assert content in out
