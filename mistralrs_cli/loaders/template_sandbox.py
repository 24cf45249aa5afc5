"""A jinja2 sandbox whose renders are bounded in time and memory.

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python, but not from
looping for hours (`range` nested in `range`), building a 10 GB string (`'x' * 10**10`) or a
100-million-digit number (`7**100000000`). Every place where a template can spend time or make a
big value passes through a hook here: the binary operators (`intercepted_binops`), `~`, calls,
attribute and item lookups, filters, `{{ }}` output (`finalize`), block and macro output
(`concat`), `for` loops and `range`. Each hook checks the render's Budget (one per render, per
thread), and sizes are estimated *before* a value is built wherever a single operation could be
large, so the process never allocates far beyond the limits.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import wraps
from typing import Any, Callable

import jinja2
import jinja2.runtime
import jinja2.utils
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import _PassArg

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
        size = measure(value, self.limits.max_chars)[0]
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


def measure(value: Any, limit: int) -> tuple[int, int, int]:
    """(size, depth, items): about how many characters str(value) has (strings their length,
    containers 2 per item plus the items; shared items counted each time, as str() writes them),
    how deep the containers nest and how many items they hold. Stops counting once past `limit`."""
    size, depth, items, stack = 0, 0, 0, [(value, 0)]
    while stack and size <= limit:
        v, d = stack.pop()
        depth = max(depth, d)
        if isinstance(v, (str, bytes, bytearray)):
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


def _size(value: Any) -> int:
    return measure(value, current().limits.max_chars)[0]


# ---- size estimates, made before an operation builds its value --------------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")


def _printf_size(fmt: str, args: Any) -> int:
    """`fmt % args`: each conversion writes at most the widest argument or its own width."""
    b = current()
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    b.check_ints(values)
    widest, conversions = max((_size(v) for v in values), default=0), 0
    for m in _PRINTF.finditer(fmt):
        conversions += 1
        for g in m.groups():
            if g and g != "*" and (len(g) > 12 or int(g) > b.limits.max_chars):
                b.fail("max_chars", f"asked for a width of {g[:20]}")
            widest = max(widest, int(g) if g and g != "*" else 0)
    return len(fmt) + conversions * widest


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """str.format: each field writes at most the widest argument or its spec's width."""
    b = current()
    values = [*args, *kwargs.values()]
    b.check_ints(values)
    widest, fields_ = max((_size(v) for v in values), default=0), 0
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        fields_ += 1
        for digits in re.findall(r"\d+", spec or ""):
            if len(digits) > 12 or int(digits) > b.limits.max_chars:
                b.fail("max_chars", f"asked for a width of {digits[:20]}")
            widest = max(widest, int(digits))
    return len(fmt) + fields_ * widest


def _replace_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    old, new = str(old), str(new)
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * len(new)


def _join_size(sep: str, items: list) -> int:
    return sum(_size(x) for x in items) + len(sep) * len(items)


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1 if isinstance(s, str) else 1


# str methods that can return more than they were given: name -> (self, args) -> size
_STR_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, w=0, *_: len(s) + w, "ljust": lambda s, w=0, *_: len(s) + w,
    "rjust": lambda s, w=0, *_: len(s) + w, "zfill": lambda s, w=0, *_: len(s) + w,
    "expandtabs": lambda s, tab=8, *_: len(s) + s.count("\t") * max(tab, 0),
    "replace": _replace_size,
    "translate": lambda s, table=None, *_: len(s) * max(
        [1, *(_size(v) for v in table.values())] if isinstance(table, dict) else [4]),
}


def _filter_size(name: str, args: tuple, kwargs: dict) -> int | None:
    """Filters that can return more than they were given; args without jinja's pass-arg."""
    value, rest = (args[0] if args else None), args[1:]
    opt = lambda i, key, default: rest[i] if len(rest) > i else kwargs.get(key, default)  # noqa: E731
    if name == "center":
        return _size(value) + opt(0, "width", 80)
    if name == "indent":
        width = opt(0, "width", 4)
        return _size(value) + _lines(value) * (len(width) if isinstance(width, str) else width)
    if name == "join":
        return _join_size(str(opt(0, "d", "")), value if isinstance(value, list) else [])
    if name == "replace":
        return _replace_size(str(value), opt(0, "old", ""), opt(1, "new", ""), opt(2, "count", None))
    if name == "format":
        return _printf_size(str(value), kwargs or tuple(rest))
    if name == "wordwrap":  # pure Python (textwrap): its input is kept small enough to be quick
        wrap = opt(2, "wrapstring", None)
        return _size(value) * max(4, 1 + len(wrap if isinstance(wrap, str) else "\n"))
    if name == "round":  # round(5, -n) computes 10**n
        current().int_result(4 * abs(opt(0, "precision", 0)))
    if name == "urlize":  # a Python loop per word, ~5 s a million characters: kept far smaller
        return 32 * _size(value)
    if name in ("batch", "slice"):
        count, fill = opt(0, "linecount" if name == "batch" else "slices", 1), opt(1, "fill_with", None)
        if name == "slice":
            current().iterate(max(count, 0))  # do_slice loops `slices` times
        return _size(value) + max(count, 0) * (2 + (_size(fill) if fill is not None else 0))
    if name == "sum":
        # lists and tuples add up by copying the running total once per item
        items = value if isinstance(value, list) else []
        if any(not isinstance(x, (int, float)) for x in items):
            return len(items) * _join_size("", items)  # the copying, not just the result
    if name in ("tojson", "pprint"):
        size, depth, items = measure(value, current().limits.max_chars)
        indent = opt(1, "indent", None) if name == "tojson" else 1
        step = len(indent) if isinstance(indent, str) else indent or 0
        # one line per item, indented by its depth; pprint is pure Python, kept small like urlize
        return size * (16 if name == "pprint" else 1) + items * depth * step
    return None


# ---- the environment ---------------------------------------------------------------------------

class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        # `a ~ b` compiles to a bare str_join jinja does not intercept; route it through the budget
        self.write("environment.tilde((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Counted:
    """A for loop's iterable: each item it yields counts toward the render's iterations (so even
    a loop whose body calls nothing is bounded); len() is the iterable's, for loop.length."""

    def __init__(self, iterable: Any):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self) -> Iterator[Any]:
        b = current()
        for item in self.iterable:
            b.iterate()
            yield item


@jinja2.pass_context  # never folded at compile time: the loop is counted when it runs
def _counted_loop(_context: Any, iterable: Any) -> _Counted:
    return _Counted(iterable)


def _range(*args: int) -> range:
    rng = safe_range(*args)  # jinja's own MAX_RANGE per call still applies
    current().iterate(len(rng))
    return rng


def _checked_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` behind the budget. The wrapper takes the context, which also stops jinja from
    running the filter at compile time (constant folding), where `{{ 'x'|center(8000000) }}`
    repeated would build gigabytes of constants before any render."""
    pass_arg = _PassArg.from_obj(func)
    lead = {None: lambda c: (), _PassArg.context: lambda c: (c,),
            _PassArg.eval_context: lambda c: (c.eval_ctx,),
            _PassArg.environment: lambda c: (c.environment,)}[pass_arg]

    @jinja2.pass_context
    def bounded(context: Any, *args: Any, **kwargs: Any) -> Any:
        b = current()
        b.tick()
        if args and isinstance(args[0], Iterator):  # map/select output: count what it yields
            args = (list(_Counted(args[0])), *args[1:])
        b.expect(_size(args[0]) if args else 0)
        b.check_ints([*args[1:], *kwargs.values()])
        size = _filter_size(name, args, kwargs)
        if size is not None:
            b.expect(size)
        return b.created(func(*lead(context), *args, **kwargs))
    bounded.__name__ = bounded.__qualname__ = getattr(func, "__name__", name)
    return bounded


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    current().expect(n * max * 16)  # up to `max` words of up to ~15 letters, n times
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with every way to spend time or memory going through the
    thread's current Budget. Renders and compiles must run inside `with budget(limits):`."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any):
        super().__init__(finalize=self._finalize, **kwargs)
        self.globals.update(range=_range, lipsum=_lipsum)
        self.filters["_counted_loop"] = _counted_loop

    def bound_filters(self) -> None:
        """Wrap every filter (call after adding your own)."""
        for name, func in list(self.filters.items()):
            if name != "_counted_loop":
                self.filters[name] = _checked_filter(name, func)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_counted_loop", [], [], None, None, lineno=loop.lineno)
        tree.set_environment(self)
        return tree

    def _finalize(self, value: Any) -> Any:
        current().expect(_size(value))  # `{{ value }}` is about to become str(value)
        return value

    def concat(self, parts: Any) -> str:  # type: ignore[override]  # block/macro/template output
        b, out, size = current(), [], 0
        for part in parts:
            size += len(part)
            out.append(part)
            if len(out) % 256 == 0 or size > b.limits.max_chars:
                b.expect(size)
        b.expect(size)
        return "".join(out)

    def tilde(self, parts: tuple) -> str:
        current().expect(sum(_size(p) for p in parts))
        return current().created(jinja2.runtime.str_join(parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        b = current()
        b.tick()
        if type(left) is int and type(right) is int:
            if operator == "**" and right > 0 and abs(left) > 1:
                b.int_result(right * left.bit_length())
            elif operator == "*":
                b.int_result(left.bit_length() + right.bit_length())
        elif operator == "*" and isinstance(right, int) and not isinstance(left, (int, float)):
            b.expect(_size(left) * right)
        elif operator == "*" and isinstance(left, int) and not isinstance(right, (int, float)):
            b.expect(_size(right) * left)
        elif operator == "+":
            b.expect(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            b.expect(_printf_size(left, right))
        return b.created(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        b = current()
        b.tick()
        value = super().getitem(obj, argument)
        return b.created(value) if isinstance(argument, slice) else value

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        inner = super().wrap_str_format(value)
        if inner is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @wraps(inner)
        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                current().expect(_format_size(fmt, (), args[0]))
            else:
                current().expect(_format_size(fmt, args, kwargs))
            return current().created(inner(*args, **kwargs))
        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = current()
        b.tick()
        b.check_ints([*args, *kwargs.values()])
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "join" and args:
            args = (list(_Counted(args[0])), *args[1:])
            b.expect(_join_size(owner, args[0]))
        elif isinstance(owner, str) and name in _STR_METHODS:
            b.expect(_STR_METHODS[name](owner, *args, **kwargs))
        return b.created(super().call(__context, __obj, *args, **kwargs))
