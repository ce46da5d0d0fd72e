"""Chat templates are code from the checkpoint: they render in jinja2's immutable sandbox under limits
no real template comes near (DeepSeek-V3's renders a long chat in milliseconds), TemplateLimits:
TEMPLATE_TIME_LIMIT_S seconds; TEMPLATE_MAX_CHARS characters of output and of any one value it
computes; TEMPLATE_MAX_WORK_CHARS characters of all the values it computes together; range() of at
most TEMPLATE_MAX_RANGE items; TEMPLATE_MAX_SOURCE_CHARS characters of source. Past one, rendering
stops (Overrun, which checkpoint/tokenizer.py turns into TemplateLimitError): a for loop checks the
clock per item (one that prints nothing too), and the operations whose result can dwarf their input
('x' * 10**10, 'x'.center(10**10), s|indent(10**6), str.format widths) are refused before they run.
Renders equal plain jinja2's output.
"""
from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.environment import Environment
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from ..errors import InputError

TEMPLATE_TIME_LIMIT_S = 10.0
TEMPLATE_MAX_CHARS = 1_000_000           # a 128k-token chat is ~500k characters
TEMPLATE_MAX_WORK_CHARS = 20_000_000     # each value counted once made: a chat passes through a few filters
TEMPLATE_MAX_RANGE = 10_000              # jinja's own bound is 100,000
TEMPLATE_MAX_SOURCE_CHARS = 50_000       # real templates are 1-20 KB; compiling one is not on the clock


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may use (the module docstring says why these values)."""
    seconds: float = TEMPLATE_TIME_LIMIT_S
    chars: int = TEMPLATE_MAX_CHARS
    work_chars: int = TEMPLATE_MAX_WORK_CHARS
    range: int = TEMPLATE_MAX_RANGE
    source_chars: int = TEMPLATE_MAX_SOURCE_CHARS


class TemplateLimitError(InputError):
    """A chat template ran past one of its TemplateLimits."""


class Overrun(Exception):
    """A render ran past its TemplateLimits. Not a ValueError, so no filter's `except ValueError`
    mistakes it for bad input and carries on; apply_chat_template turns it into TemplateLimitError."""


def compile_template(source: str, limits: TemplateLimits):
    """The template's code: parsed, rewritten by _Metering, compiled (jinja folds constant filter
    calls here, through the same metered filters)."""
    env = _Sandbox(_Budget(limits))
    tree = _Metering().visit(env.parse(source))
    tree.set_environment(env)
    return env.compile(tree)


def render(code, limits: TemplateLimits, variables: dict[str, Any]) -> str:
    """Run compiled template code on its own sandbox and budget (so concurrent renders share nothing),
    streaming the output to count it and check the clock between chunks."""
    env = _Sandbox(_Budget(limits))
    template = env.template_class.from_code(env, code, env.make_globals(None))
    out, printed = [], 0
    for chunk in template.generate(**variables):
        printed += len(chunk)
        if printed > limits.chars:
            raise Overrun(f"printed more than {limits.chars} characters")
        env.budget.tick()
        out.append(chunk)
    return "".join(out)


class _Metering(NodeTransformer):
    """Rewrites a parsed template so that what it prints, joins with ~, and builds as a list, tuple or
    dict literal passes through environment._meter (measured by _Sandbox.call: printing inside a macro
    or a {% set %} block builds strings that never reach the output stream), and every for loop
    iterates through environment._items (the clock checked per item). A template cannot name
    `environment`, so it cannot undo this."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _env_call("_items", node.iter)
        return node

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [_env_call("_meter", n) for n in node.nodes]
        return node

    def visit_Concat(self, node):   # each part measured before str() joins it
        node = self.generic_visit(node)
        node.nodes = [_env_call("_meter", n) for n in node.nodes]
        return _env_call("_meter", node)

    def visit_List(self, node):
        node = self.generic_visit(node)
        return _env_call("_meter", node) if getattr(node, "ctx", "load") == "load" else node

    visit_Tuple = visit_Dict = visit_List


def _env_call(name: str, node: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name, lineno=node.lineno), [node], [], None, None,
                      lineno=node.lineno)


_CONTAINERS = (list, tuple, dict, set, frozenset)


class _Budget:
    """One render's allowance: a deadline, the size of any one value, the sizes of all values made.
    A size is about what str() prints; a list holding one list many times counts it each time."""

    def __init__(self, limits: TemplateLimits):
        self.limits, self.work = limits, 0
        self.deadline = time.monotonic() + limits.seconds
        self.known: dict[int, tuple[Any, int]] = {}   # id -> (container, kept alive so ids stay unique; size)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Overrun(f"ran for more than {self.limits.seconds:g} s")

    def need(self, n: int) -> None:
        """Refuse to make, or pass on, a value of n characters."""
        if n > self.limits.chars:
            raise Overrun(f"would make or pass on a value of {n} characters or more (at most "
                           f"{self.limits.chars})")

    def charge(self, value: Any) -> Any:
        """value, counted: it exists already (its making was predicted, or cannot outgrow its inputs)."""
        n = self.size(value)
        self.need(n)
        self.work += n
        if self.work > self.limits.work_chars:
            raise Overrun(f"computed more than {self.limits.work_chars} characters in all")
        self.tick()
        return value

    def size(self, value: Any) -> int:
        """Counting stops just past the limit, so a list nested in itself 2**40 times over costs
        `chars` steps, not 2**40."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if not isinstance(value, _CONTAINERS):
            return 1
        if id(value) in self.known:
            return self.known[id(value)][1]
        total, stack = 0, [value]
        while stack and total <= self.limits.chars:
            v = stack.pop()
            if isinstance(v, (str, bytes)):
                total += len(v) + 2
            elif isinstance(v, dict):
                total += 2 + 2 * len(v)
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, _CONTAINERS):
                total += 2 + 2 * len(v)
                stack.extend(v)
            else:
                total += 1
        if total <= self.limits.chars:
            self.known[id(value)] = (value, total)
        return total


def _count(n: Any) -> int:
    """n as a repeat count or width (the call itself refuses anything but an int)."""
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _digits(text: str) -> int:
    """A width or precision written in a format string; a 12-digit one is no less absurd than 10**12."""
    return int(text) if len(text) < 12 else 10 ** 12


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")


def _percent_size(fmt: str, args: Any, size) -> int:
    """Characters fmt % args prints at most: its text, its arguments, every field's width and precision
    (a mapping's values once per field: %(a)s%(a)s prints a twice)."""
    fields = _PERCENT_FIELD.findall(fmt)
    widths = sum(_digits(x) for field in fields for x in field if x not in ("", "*"))
    items = args if isinstance(args, tuple) else (args,)
    if any("*" in field for field in fields):
        widths += sum(_count(a) for a in items)
    if isinstance(args, dict):
        return len(fmt) + widths + len(fields) * max((size(v) for v in args.values()), default=0)
    return len(fmt) + widths + sum(size(a) for a in items)


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    """The argument a call passes at position i or as key."""
    return args[i] if len(args) > i else kwargs.get(key, default)


def _joined(items: list, sep: Any, size) -> int:
    return sum(size(i) for i in items) + len(str(sep)) * max(len(items) - 1, 0)


def _grown(name: str, value: Any, args: tuple, kwargs: dict, size) -> int:
    """Characters (or items) the str method or filter `name` makes from value at most, for those whose
    result can dwarf their input ('x'.center(10**10), s|indent(10**6), s.replace('', big)); 0 for the
    rest, whose result is measured once made."""
    def arg(i, key, default=None):
        return _arg(args, kwargs, i, key, default)
    if name in ("center", "ljust", "rjust", "zfill"):
        return _count(arg(0, "width", 80))
    if name == "to_bytes":           # (1).to_bytes(10**10)
        return _count(arg(0, "length", 1))
    if name in ("batch", "slice"):   # fill_with pads to the count; slice loops over it
        return _count(arg(0, "linecount" if name == "batch" else "slices"))
    if name == "format":             # the filter: value % args
        return _percent_size(value, kwargs or args, size) if isinstance(value, str) else 0
    if name not in ("indent", "expandtabs", "replace", "wordwrap", "translate"):
        return 0
    text = value if isinstance(value, str) else str(value)
    if name == "translate":          # each character may map to a long string
        table = arg(0, "table")
        entries = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
        return len(text) * max((len(e) for e in entries if isinstance(e, (str, bytes))), default=1)
    if name == "indent":
        width = arg(0, "width", 4)
        return len(text) + (text.count("\n") + 1) * (len(width) if isinstance(width, str) else _count(width))
    if name == "expandtabs":
        return len(text) + text.count("\t") * _count(arg(0, "tabsize", 8))
    if name == "wordwrap":
        return len(text) * (1 + len(str(arg(2, "wrapstring") or "\n")))
    old, new, count = str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count")
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


class _Ticking:
    """A loop's iterable, checking the clock per item: a loop that prints nothing stops in time too."""

    def __init__(self, items, budget: _Budget):
        self.items, self.budget = items, budget

    def __iter__(self):
        for item in self.items:
            self.budget.tick()
            yield item

    def __len__(self):                # loop.length; a TypeError here makes jinja count the items itself
        return len(self.items)


class _MeteredFields:
    """str.format's fields, each width refused past the limit and each result counted (string.Formatter
    formats field by field in Python, so '{0}' * 10**5 formats a big value one counted field at a time)."""
    budget: _Budget

    def format_field(self, value, format_spec):
        self.budget.need(sum(_digits(d) for d in re.findall(r"\d+", format_spec)))
        return self.budget.charge(super().format_field(value, format_spec))


class _Formatter(_MeteredFields, SandboxedFormatter):
    pass


class _EscapeFormatter(_MeteredFields, SandboxedEscapeFormatter):
    pass


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (loop controls, a tojson that keeps non-ASCII,
    raise_exception, strftime_now) in jinja2's immutable sandbox, metering one render against its
    budget: every call and filter (clock; arguments and result measured; results that can dwarf their
    inputs predicted and refused first), the operators that can (* ** % predicted, + measured),
    str.format field by field, range(), and what _Metering routes through _meter and _items."""
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, budget: _Budget):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.budget = budget
        self.filters["tojson"] = self._tojson
        self.filters = {name: self._metered(name, f) for name, f in self.filters.items()}
        del self.globals["lipsum"]   # n paragraphs of filler in one call; no chat template uses it
        self.globals.update(range=self._range, raise_exception=_raise_exception,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt))

    @staticmethod
    def _meter(value: Any) -> Any:
        return value                 # measured on its way through call()

    def _items(self, items) -> _Ticking:
        return _Ticking(items, self.budget)

    def _range(self, *args: int) -> range:
        r = range(*args)
        if len(r) > self.budget.limits.range:
            raise Overrun(f"asked for range() of {len(r)} items (at most {self.budget.limits.range})")
        return r

    def _tojson(self, x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        """json.dumps(x, ...) as transformers' tojson, encoded chunk by chunk so that indent cannot
        blow a deeply nested value up unseen (nor build its ' ' * indent first)."""
        self.budget.need(_count(indent))
        encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                   sort_keys=sort_keys)
        out, n = [], 0
        for chunk in encoder.iterencode(x):
            n += len(chunk)
            self.budget.need(n)
            out.append(chunk)
        return "".join(out)

    def _metered(self, name: str, f):
        """Filter f, metered as call() meters calls. jinja passes some filters its context, eval context
        or environment first (functools.wraps keeps the marker that says which)."""
        @functools.wraps(f)
        def metered(*args, **kwargs):
            b = self.budget
            b.tick()
            for v in (*args, *kwargs.values()):
                b.need(b.size(v))
            lead = 1 if args and isinstance(args[0], (Context, EvalContext, Environment)) else 0
            if name in ("join", "sum") and len(args) > lead:   # an iterator, listed to be measured first
                items = list(args[lead])
                args = (*args[:lead], items, *args[lead + 1:])
                sep = _arg(args[lead + 1:], kwargs, 0, "d", "") if name == "join" else ""
                b.need(_joined(items, sep, b.size))
            elif len(args) > lead:
                b.need(_grown(name, args[lead], args[lead + 1:], kwargs, b.size))
            return b.charge(f(*args, **kwargs))
        return metered

    def call(self, context, obj, /, *args, **kwargs):  # positional-only: no clash with a call's kwargs
        b = self.budget
        if obj is _Sandbox._meter:     # the commonest call by far: one value, measured once
            return b.charge(args[0])
        b.tick()
        for k, v in (*enumerate(args), *kwargs.items()):
            if k not in ("_loop_vars", "_block_vars"):   # jinja's: the variables a loop or block set
                b.need(b.size(v))
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, bytes)) and obj.__name__ == "join" and args:
            args = (list(args[0]), *args[1:])
            b.need(_joined(args[0], owner, b.size))
        elif isinstance(owner, (str, bytes, int)):
            b.need(_grown(obj.__name__, owner, args, kwargs, b.size))
        return b.charge(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = self.budget
        b.tick()
        b.need(max(b.size(left), b.size(right)))
        if operator == "*":
            b.need(_product_size(left, right, b.size))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            b.need(abs(left).bit_length() * right if abs(left) > 1 else 0)   # an int's size: its bits
        elif operator == "%" and isinstance(left, str):
            b.need(_percent_size(left, right, b.size))
        return b.charge(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any):
        """str.format / format_map of a string, through _Formatter (jinja's own wrapper, metered)."""
        f_self = getattr(value, "__self__", None)
        if not (isinstance(f_self, str) and callable(value) and value.__name__ in ("format", "format_map")):
            return None
        formatter = (_EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup) else
                     _Formatter(self))
        formatter.budget = self.budget

        def format(*args, **kwargs):
            if value.__name__ == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(f_self)(formatter.vformat(f_self, args, kwargs))
        return functools.update_wrapper(format, value)


def _product_size(left: Any, right: Any, size) -> int:
    """What left * right makes: a sequence repeated (its size times the count) or an int (its bits)."""
    for seq, n in ((left, right), (right, left)):
        if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)):
            return size(seq) * max(n, 0)
    if isinstance(left, int) and isinstance(right, int):
        return abs(left).bit_length() + abs(right).bit_length()
    return 0


def _raise_exception(message):
    raise TemplateError(message)
