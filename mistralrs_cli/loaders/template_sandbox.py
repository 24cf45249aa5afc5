"""A jinja2 sandbox whose renders are bounded in time and memory (the limits and the size
estimates are in template_budget.py).

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python, but not from
looping for hours (`range` nested in `range`), building a 10 GB string (`'x' * 10**10`) or a
100-million-digit number (`7**100000000`). Every place where a template can spend time or make a
big value passes through a hook here: the binary operators (`intercepted_binops`), `~`, calls,
attribute and item lookups, filters, `{{ }}` output (`finalize`), block and macro output
(`concat`), `for` loops and `range`. Each hook checks the render's Budget (one per render, per
thread), and sizes are estimated *before* a value is built wherever a single operation could be
large, so the process never allocates far beyond the limits.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import wraps
from typing import Any, Callable

import jinja2
import jinja2.runtime
import jinja2.utils
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import _PassArg

from .template_budget import (STR_METHOD_SIZES, current, filter_size, format_size, join_size,
                              printf_size, size_of)


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
        b.expect(size_of(args[0]) if args else 0)
        b.check_ints([*args[1:], *kwargs.values()])
        size = filter_size(name, args, kwargs)
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
        current().expect(size_of(value))  # `{{ value }}` is about to become str(value)
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
        current().expect(sum(size_of(p) for p in parts))
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
            b.expect(size_of(left) * right)
        elif operator == "*" and isinstance(left, int) and not isinstance(right, (int, float)):
            b.expect(size_of(right) * left)
        elif operator == "+":
            b.expect(size_of(left) + size_of(right))
        elif operator == "%" and isinstance(left, str):
            b.expect(printf_size(left, right))
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
                current().expect(format_size(fmt, (), args[0]))
            else:
                current().expect(format_size(fmt, args, kwargs))
            return current().created(inner(*args, **kwargs))
        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = current()
        b.tick()
        b.check_ints([*args, *kwargs.values()])
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "join" and args:
            args = (list(_Counted(args[0])), *args[1:])
            b.expect(join_size(owner, args[0]))
        elif isinstance(owner, str) and name in STR_METHOD_SIZES:
            b.expect(STR_METHOD_SIZES[name](owner, *args, **kwargs))
        return b.created(super().call(__context, __obj, *args, **kwargs))
