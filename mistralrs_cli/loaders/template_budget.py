"""What a chat template render may spend, and the size estimates its sandbox checks against it.

Each render gets a Budget (per thread, set by `with budget(limits):`) that template_sandbox's
hooks charge: time, loop iterations, characters built, integer sizes. The *_size functions
estimate what an operation would build before it builds it, so one `'x' * 10**10` is refused
instead of allocated.

The limits (defaults in TemplateLimits, each raised by its environment variable):
    MISTRALRS_TEMPLATE_SECONDS     5          wall time of one render
    MISTRALRS_TEMPLATE_MAX_CHARS   8388608    characters of the prompt, and of any one string or
                                              list the template builds (list items count 2 each
                                              plus their own size)
    MISTRALRS_TEMPLATE_ITERATIONS  1000000    for-loop iterations plus range() items, in total
    MISTRALRS_TEMPLATE_INT_BITS    65536      bits of an integer made by * or **
    MISTRALRS_TEMPLATE_SOURCE_CHARS 131072    characters of the template itself (compiling one
                                              takes seconds and hundreds of MB per 100K; real
                                              templates are a few thousand)
A render also stops after creating 16 x MAX_CHARS characters in all (every intermediate string).
"""
from __future__ import annotations

import os
import re
import string
import threading
import time
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable

import jinja2
import jinja2.utils

from mistralrs_cli.errors import UserError


@dataclass(frozen=True)
class TemplateLimits:
    seconds: float = 5.0
    max_chars: int = 8 * 2**20
    iterations: int = 1_000_000
    int_bits: int = 65536
    source_chars: int = 128 * 1024

    @classmethod
    def from_env(cls) -> "TemplateLimits":
        """The defaults, each replaced by MISTRALRS_TEMPLATE_<NAME> when that is set."""
        values = {}
        for f in fields(cls):
            var = f"MISTRALRS_TEMPLATE_{f.name.upper()}"
            raw = os.environ.get(var)
            if raw is None:
                continue
            try:
                value = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                value = 0
            if not value > 0 or value != value or value == float("inf"):
                raise UserError(f"{var}={raw!r} is not a positive {f.type}; unset it or give "
                                f"a larger {f.type} than the default {getattr(cls, f.name)}.")
            values[f.name] = value
        return cls(**values)


class BudgetExceeded(jinja2.TemplateRuntimeError):
    """A render went over one of its limits; `limit` names which (TemplateLimits field)."""

    def __init__(self, limit: str, detail: str):
        super().__init__(detail)
        self.limit = limit
        self.detail = detail


class Budget:
    """What one render may still spend; once over any limit it stays over (a hook that jinja
    swallows an error from is followed by another that raises again)."""

    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.iterations = limits.iterations
        self.chars = 16 * limits.max_chars
        self.over: BudgetExceeded | None = None
        # measure() results of the render's inputs, by id: they live (so their ids stay theirs)
        # and cannot change for the whole render, and `messages|length` in a loop over the
        # messages would otherwise walk them all once per message
        self.known: dict[int, tuple[int, int, int]] = {}

    def learn(self, value: Any) -> tuple[int, int, int]:
        """Measure the render's inputs (plain JSON data) once, remembering every container."""
        if isinstance(value, (list, dict)):
            children = value.items() if isinstance(value, dict) else ((x,) for x in value)
            size, depth, items = 2 + (4 if isinstance(value, dict) else 2) * len(value), 0, len(value)
            for child in children:
                for x in child:
                    s, d, n = self.learn(x)
                    size, depth, items = size + s, max(depth, d + 1), items + n
            self.known[id(value)] = (size, depth, items)
            return size, depth, items
        return measure(value, 2**62)

    def fail(self, limit: str, detail: str) -> None:
        self.over = BudgetExceeded(limit, detail)
        raise self.over

    def tick(self) -> None:
        if self.over is not None:
            raise self.over
        if time.monotonic() > self.deadline:
            self.fail("seconds", f"did not finish within {self.limits.seconds:g} s")

    def iterate(self, n: int = 1) -> None:
        self.iterations -= n
        if self.iterations < 0:
            self.fail("iterations", f"looped more than {self.limits.iterations:,} times")
        self.tick()

    def expect(self, size: int) -> None:
        """Refuse to build a value of `size` characters before building it."""
        self.tick()
        if size > self.limits.max_chars:
            self.fail("max_chars", f"built a value of more than {self.limits.max_chars:,} characters")

    def created(self, value: Any) -> Any:
        """Count a value just built toward the per-render total; returns it."""
        if type(value) is int:  # e.g. from `|int(base=2)` of a long string
            self.int_result(value.bit_length())
        size = measure(value, self.limits.max_chars, self.known)[0]
        self.expect(size)
        self.chars -= size
        if self.chars < 0:
            self.fail("max_chars", f"built more than {16 * self.limits.max_chars:,} characters in all")
        return value

    def check_ints(self, values: Any) -> None:
        """No call gets an integer beyond max_chars: widths, counts and byte lengths (center,
        to_bytes, lipsum, ...) would each build a value that large."""
        for v in values:
            if type(v) is int and abs(v) > self.limits.max_chars:
                self.fail("max_chars", f"asked for a size of {_short(v)}")

    def int_result(self, bits: int) -> None:
        if bits > self.limits.int_bits:
            self.fail("int_bits", f"computed a number of more than {self.limits.int_bits:,} bits")


_LOCAL = threading.local()


def current() -> Budget:
    # outside `with budget()` (a template used directly) each operation still gets the defaults
    return getattr(_LOCAL, "budget", None) or Budget(TemplateLimits())


@contextmanager
def budget(limits: TemplateLimits) -> Iterator[Budget]:
    previous = getattr(_LOCAL, "budget", None)
    _LOCAL.budget = b = Budget(limits)
    try:
        yield b
    finally:
        _LOCAL.budget = previous


def _short(n: int) -> str:
    return f"{n:,}" if n.bit_length() < 64 else f"a {n.bit_length():,}-bit number"


def measure(value: Any, limit: int, known: dict | None = None) -> tuple[int, int, int]:
    """(size, depth, items): about how many characters str(value) has (strings their length,
    containers 2 per item plus the items; shared items counted each time, as str() writes them),
    how deep the containers nest and how many items they hold. Stops counting once past `limit`.
    `known`: id -> these three, for containers measured before (Budget.learn)."""
    size, depth, items, stack = 0, 0, 0, [(value, 0)]
    while stack and size <= limit:
        v, d = stack.pop()
        depth = max(depth, d)
        if known and id(v) in known:
            s, deep, n = known[id(v)]
            size, depth, items = size + s, max(depth, d + deep), items + n
        elif isinstance(v, (str, bytes, bytearray)):
            size += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            size, items = size + 2 + 2 * len(v), items + len(v)
            flat = _flat_size(v)
            if flat is None:
                stack.extend((x, d + 1) for x in v)
            else:
                size, depth = size + flat, max(depth, d + 1) if v else depth
        elif isinstance(v, dict):
            size, items = size + 2 + 4 * len(v), items + len(v)
            stack.extend((x, d + 1) for kv in v.items() for x in kv)
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append((object.__getattribute__(v, "_Namespace__attrs"), d + 1))
        elif type(v) is int:
            size += v.bit_length() // 3 + 1
        else:
            size += 8
    return size, depth, items


_SCALARS = frozenset({int, bool, float, type(None)})


def _flat_size(items: Any) -> int | None:
    """The size of a container's items when they are all strings or all numbers, at C speed
    (a million-item list costs milliseconds instead of seconds); None when mixed."""
    kinds = set(map(type, items))
    if kinds <= {str}:
        return sum(map(len, items))
    if kinds <= {int, bool}:
        return sum(map(int.bit_length, items)) // 3 + len(items)
    if kinds <= _SCALARS | {str}:  # a float's repr is at most 24 characters
        return sum(len(x) if type(x) is str else 24 for x in items)
    return None


def size_of(value: Any) -> int:
    b = current()
    return measure(value, b.limits.max_chars, b.known)[0]


# ---- size estimates, made before an operation builds its value --------------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")


def printf_size(fmt: str, args: Any) -> int:
    """`fmt % args`: each conversion writes at most the widest argument or its own width."""
    b = current()
    values = (list(args.values()) if isinstance(args, dict) else
              list(args) if isinstance(args, tuple) else [args])
    b.check_ints(values)
    widest, conversions = max((size_of(v) for v in values), default=0), 0
    for m in _PRINTF.finditer(fmt):
        conversions += 1
        for g in m.groups():
            if g and g != "*" and (len(g) > 12 or int(g) > b.limits.max_chars):
                b.fail("max_chars", f"asked for a width of {g[:20]}")
            widest = max(widest, int(g) if g and g != "*" else 0)
    return len(fmt) + conversions * widest


def format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """str.format: each field writes at most the widest argument or its spec's width."""
    b = current()
    values = [*args, *kwargs.values()]
    b.check_ints(values)
    widest, fields_ = max((size_of(v) for v in values), default=0), 0
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        fields_ += 1
        for digits in re.findall(r"\d+", spec or ""):
            if len(digits) > 12 or int(digits) > b.limits.max_chars:
                b.fail("max_chars", f"asked for a width of {digits[:20]}")
            widest = max(widest, int(digits))
    return len(fmt) + fields_ * widest


def replace_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    old, new = str(old), str(new)
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * len(new)


def join_size(sep: str, items: list) -> int:
    return sum(size_of(x) for x in items) + len(sep) * len(items)


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1 if isinstance(s, str) else 1


# str methods that can return more than they were given: name -> (self, args) -> size
STR_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, w=0, *_: len(s) + w, "ljust": lambda s, w=0, *_: len(s) + w,
    "rjust": lambda s, w=0, *_: len(s) + w, "zfill": lambda s, w=0, *_: len(s) + w,
    "expandtabs": lambda s, tab=8, *_: len(s) + s.count("\t") * max(tab, 0),
    "replace": replace_size,
    "translate": lambda s, table=None, *_: len(s) * max(
        [1, *(size_of(v) for v in table.values())] if isinstance(table, dict) else [4]),
}


def _sequence_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    count, fill = opt(0, "linecount" if name == "batch" else "slices", 1), opt(1, "fill_with", None)
    if name == "slice":
        current().iterate(max(count, 0))  # do_slice loops `slices` times
    return size_of(value) + max(count, 0) * (2 + (size_of(fill) if fill is not None else 0))


def _sum_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    # lists add up by copying the running total (from `start` on) once per item
    items = value if isinstance(value, list) else []
    if all(isinstance(x, (int, float)) for x in items):
        return 0
    return len(items) * (join_size("", items) + size_of(opt(1, "start", 0)))


def _dump_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    size, depth, items = measure(value, current().limits.max_chars, current().known)
    indent = opt(1, "indent", None) if name == "tojson" else 1
    step = len(indent) if isinstance(indent, str) else indent or 0
    separators = size_of(opt(2, "separators", None)) if name == "tojson" else 0
    # one line per item indented by its depth, a separator after each; pprint is pure Python,
    # so its input is kept small (like urlize's)
    return size * (16 if name == "pprint" else 1) + items * (depth * step + separators)


def _round_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    current().int_result(4 * abs(opt(0, "precision", 0)))  # round(5, -n) computes 10**n
    return 0


def _indent_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    width = opt(0, "width", 4)
    return size_of(value) + _lines(value) * (len(width) if isinstance(width, str) else width)


def _join_filter_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    # every item once, plus the separator between each two: a range or a string's characters
    # joined by a long separator grow by its length times their number
    return size_of(value) + len(str(opt(0, "d", ""))) * (len(value) if isinstance(value, Sized) else 0)


def _wordwrap_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    wrap = opt(2, "wrapstring", None)  # pure Python (textwrap): its input is kept small
    return size_of(value) * max(4, 1 + len(wrap if isinstance(wrap, str) else "\n"))


def _urlize_size(value: Any, opt: Callable[..., Any], name: str) -> int:
    # a Python loop per word (~5 s a million characters), and target/rel are copied into each link
    extra = sum(size_of(opt(i, key, "")) for i, key in ((2, "target"), (3, "rel")))
    return size_of(value) * (32 + extra)


# filters that can return more than they were given: name -> (value, opt, name) -> size
_FILTER_SIZES: dict[str, Callable[[Any, Callable[..., Any], str], int]] = {
    "center": lambda value, opt, _: size_of(value) + opt(0, "width", 80),
    "indent": _indent_size, "join": _join_filter_size, "wordwrap": _wordwrap_size,
    "replace": lambda value, opt, _: replace_size(str(value), opt(0, "old", ""), opt(1, "new", ""),
                                                  opt(2, "count", None)),
    "format": lambda value, opt, _: 0,  # replaced in filter_size: it needs every argument
    "batch": _sequence_size, "slice": _sequence_size, "sum": _sum_size,
    "tojson": _dump_size, "pprint": _dump_size, "round": _round_size, "urlize": _urlize_size,
}


def filter_size(name: str, args: tuple, kwargs: dict) -> int | None:
    """What filter `name` would build from args (without jinja's pass-arg); None: no more than
    it was given."""
    if name not in _FILTER_SIZES:
        return None
    value, rest = (args[0] if args else None), args[1:]
    if name == "format":
        return printf_size(str(value), kwargs or tuple(rest))

    def opt(i: int, key: str, default: Any) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)
    return _FILTER_SIZES[name](value, opt, name)
