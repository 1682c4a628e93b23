"""FTIR elementwise ops as Triton expressions (core `tl` only: no libdevice).

Values are held in a *compute type*: f16, bf16 and fp8 compute in f32 (as torch's CUDA
kernels do), everything else in its own type.  Every op whose result is a narrow float
rounds that result to its type (`(x + y).to(tl.bfloat16).to(tl.float32)`), as eager
torch stores each op's result in it: the program means what its types say.  Keeping a
chain of bf16 ops in f32 instead would be closer to exact arithmetic, but not to the
program: a later cast to f32 would keep digits the bf16 value never had, and a
comparison, `floor` or integer cast of the unrounded value can differ from eager's
by a whole step.  Ops whose result is one of their operands, or an integer next to one
(neg, abs, where, floor, ...), are exact in the operands' type and skip the rounding.

NaN semantics follow torch: `maximum`/`minimum`/`clamp` propagate NaN
(`propagate_nan=tl.PropagateNan.ALL`; the default drops NaN on GPUs), `relu(nan)` is NaN,
`sign(nan)` is 0.  Functions `tl` lacks are written with accurate formulas: short Taylor
series near 0 for expm1/log1p/tanh (where the textbook formulas cancel), half-to-even
`round`, the Cephes polynomial for `atan`.  The series and that polynomial are f32-accurate;
f64 uses Kahan's and Goldberg's forms of expm1 and log1p (exact up to the rounding of exp and
log) and tanh from that expm1, and f64 `atan` is not generated (the region runs in eager torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flagtree.backends.lowering import UnsupportedRegion
from flagtree.ir.core import Operation
from flagtree.ir.opdef import lookup
from flagtree.ir.types import ScalarType, TensorType

_STORAGE = {
    "f64": "tl.float64", "f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16",
    "f8E4M3FN": "tl.float8e4nv", "f8E5M2": "tl.float8e5",
    "i1": "tl.int1", "i8": "tl.int8", "i16": "tl.int16", "i32": "tl.int32", "i64": "tl.int64", "ui8": "tl.uint8",
}
_NARROW_FLOATS = frozenset({"f16", "bf16", "f8E4M3FN", "f8E5M2"})
_INT_LIMITS = {"i8": 8, "i16": 16, "i32": 32, "i64": 64}
NAN_ALL = "propagate_nan=tl.PropagateNan.ALL"
_F32_TINY = 2.0**-126  # the smallest normal f32


def storage_type(t: ScalarType) -> str:
    """The Triton type of `t` in memory; raises UnsupportedRegion for types Triton lacks."""
    if t.name not in _STORAGE:
        raise UnsupportedRegion(f"element type {t} has no Triton equivalent")
    return _STORAGE[t.name]


def compute_type(t: ScalarType) -> str:
    """The Triton type values of element type `t` are computed in."""
    return "tl.float32" if t.name in _NARROW_FLOATS else storage_type(t)


def is_narrow(t: ScalarType) -> bool:
    return t.name in _NARROW_FLOATS


def literal(value: Any, t: ScalarType) -> str:
    """`value` as Triton source for a constant of type `t` (negatives parenthesised)."""
    if t.name == "i1":
        return "True" if value else "False"
    if t.is_integer:
        text = str(int(value))
    else:
        value = float(value) if t.name == "f64" else torch.tensor(float(value), dtype=torch.float32).item()
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '(-float("inf"))'
        text = repr(value)
        if t.name != "f64" and 0 < abs(value) < _F32_TINY:
            # Triton types a bare literal below f32's normal range as f64.
            return f"tl.full([], {text}, tl.float32)"
    return f"({text})" if text.startswith("-") else text


def lowest(t: ScalarType) -> str:
    """The identity of max for `t`: -inf, or the smallest integer."""
    if t.is_float:
        return '(-float("inf"))'
    if t.name in ("i1", "ui8"):
        return "0"
    return f"({-(1 << (_INT_LIMITS[t.name] - 1))})"


def highest(t: ScalarType) -> str:
    """The identity of min for `t`: +inf, or the largest integer."""
    if t.is_float:
        return 'float("inf")'
    if t.name == "i1":
        return "1"
    if t.name == "ui8":
        return "255"
    return str((1 << (_INT_LIMITS[t.name] - 1)) - 1)


@dataclass(frozen=True)
class Operand:
    """One operand as the emitters see it: its source text, FTIR element type, and its
    value when it is a compile-time constant."""

    text: str
    dtype: ScalarType
    constant: Any = None

    @property
    def is_constant(self) -> bool:
        return self.constant is not None


class Temporaries(Protocol):
    def tmp(self, expr: str) -> str:
        """Assign `expr` to a fresh variable in the current scope; returns its name."""


Emitter = Callable[[Temporaries, list[Operand], Operation], str]


def emit_elementwise(code: Temporaries, operands: list[Operand], op: Operation) -> str:
    """The Triton expression computing `op` on `operands` (in compute types), its result
    rounded to its element type."""
    emitter = _EMITTERS.get(op.name)
    if emitter is None:
        raise UnsupportedRegion(f"'{op.name}' has no Triton lowering yet")
    text = emitter(code, operands, op)
    if op.name in _EXACT_IN_OPERAND_TYPE:
        return text
    result = op.results[0].type
    return rounded(text, result.dtype if isinstance(result, TensorType) else result)


def rounded(text: str, dtype: ScalarType) -> str:
    """`text`, computed in f32, rounded to `dtype` when that is a narrow float."""
    if not is_narrow(dtype):
        return text
    return f"({text}).to({storage_type(dtype)}).to(tl.float32)"


def fold_constants(operands: list[Operand], op: Operation) -> Any:
    """The value of `op` on constant operands, computed by its reference implementation."""
    opdef = lookup(op.name)
    values = [torch.tensor(o.constant, dtype=o.dtype.torch_dtype) for o in operands]
    result_types = [TensorType((), r.type.dtype if isinstance(r.type, TensorType) else r.type) for r in op.results]
    out = opdef.reference(values, dict(op.attributes), result_types)
    return out.item()


def cast_is_free(source: ScalarType, target: ScalarType) -> bool:
    """Whether the compute type of `source` already holds its values as `target` (bf16 -> f32:
    a bf16 value is held rounded, in f32)."""
    return source == target or (compute_type(source) == compute_type(target) and not is_narrow(target))


def cast(code: Temporaries, x: Operand, target: ScalarType) -> str:
    """`x` converted to `target` with torch's semantics (round to nearest even, truncate to int)."""
    if cast_is_free(x.dtype, target):
        return x.text
    if target.name == "i1":
        return f"({x.text} != 0)"
    if is_narrow(target):
        # Booleans go through f32: Triton's interpreter turns True into 0 in a direct i1 -> bf16.
        source = f"{x.text}.to(tl.float32)" if x.dtype.name == "i1" else x.text
        return f"{source}.to({storage_type(target)}).to(tl.float32)"
    return f"{x.text}.to({storage_type(target)})"


# --- emitters -------------------------------------------------------------------------


def _call(fn: str) -> Emitter:
    return lambda c, a, op: f"{fn}({a[0].text})"


def _infix(symbol: str) -> Emitter:
    return lambda c, a, op: f"{a[0].text} {symbol} {a[1].text}"


def _near_zero(c: Temporaries, x: str, series: str, formula: str) -> str:
    """`series` (a Taylor polynomial in x) for |x| < 1/8, else `formula`: avoids cancellation."""
    return f"tl.where(tl.abs({x}) < 0.125, {series}, {formula})"


def _expm1(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0].text
    if a[0].dtype.name == "f64":
        return _kahan_expm1(c, x)
    series = f"{x} * (1.0 + {x} * (0.5 + {x} * (1.0 / 6.0 + {x} * (1.0 / 24.0 + {x} * (1.0 / 120.0 + {x} / 720.0)))))"
    return _near_zero(c, x, series, f"tl.exp({x}) - 1.0")


def _kahan_expm1(c: Temporaries, x: str) -> str:
    """expm1 as (u − 1)·x / log(u), u = exp(x): the rounding errors of u cancel (Kahan)."""
    u = c.tmp(f"tl.exp({x})")
    ratio = c.tmp(f"({u} - 1.0) * ({x} / tl.log({u}))")
    saturated = c.tmp(f'tl.where({u} == float("inf"), {u}, {ratio})')
    return f"tl.where({u} == 1.0, {x}, tl.where({u} - 1.0 == -1.0, -1.0, {saturated}))"


def _log1p(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0].text
    if a[0].dtype.name == "f64":  # Goldberg: log(u)·x / (u − 1), u = 1 + x
        u = c.tmp(f"1.0 + {x}")
        ratio = f"tl.log({u}) * ({x} / ({u} - 1.0))"
        return f'tl.where({u} == 1.0, {x}, tl.where({x} == float("inf"), {x}, {ratio}))'
    series = (f"{x} * (1.0 - {x} * (0.5 - {x} * (1.0 / 3.0 - {x} * (0.25 - {x} * (0.2 - {x} * "
              f"(1.0 / 6.0 - {x} / 7.0))))))")
    return _near_zero(c, x, series, f"tl.log(1.0 + {x})")


def _tanh(c: Temporaries, a: list[Operand], op: Operation) -> str:
    return _tanh_of(c, a[0].text, a[0].dtype)


def _tanh_of(c: Temporaries, x: str, dtype: ScalarType) -> str:
    if dtype.name == "f64":  # tanh|x| = −e / (e + 2), e = expm1(−2|x|)
        e = c.tmp(_kahan_expm1(c, f"(-2.0 * tl.abs({x}))"))
        magnitude = c.tmp(f"-{e} / ({e} + 2.0)")
        return f"tl.where({x} < 0, -{magnitude}, {magnitude})"
    x2 = c.tmp(f"{x} * {x}")
    series = f"{x} * (1.0 - {x2} * (1.0 / 3.0 - {x2} * (2.0 / 15.0 - {x2} * (17.0 / 315.0))))"
    e = c.tmp(f"tl.exp(-2.0 * tl.abs({x}))")
    magnitude = c.tmp(f"(1.0 - {e}) / (1.0 + {e})")
    return _near_zero(c, x, series, f"tl.where({x} < 0, -{magnitude}, {magnitude})")


def _atan(c: Temporaries, a: list[Operand], op: Operation) -> str:
    if a[0].dtype.name == "f64":
        raise UnsupportedRegion("'ft.atan' in f64: the generated polynomial is f32-accurate only")
    x = a[0].text
    ax = c.tmp(f"tl.abs({x})")
    big = c.tmp(f"{ax} > 2.414213562373095")
    mid = c.tmp(f"{ax} > 0.4142135623730950")
    reduced = c.tmp(f"tl.where({big}, -1.0 / {ax}, tl.where({mid}, ({ax} - 1.0) / ({ax} + 1.0), {ax}))")
    offset = c.tmp(f"tl.where({big}, 1.5707963267948966, tl.where({mid}, 0.7853981633974483, 0.0))")
    z = c.tmp(f"{reduced} * {reduced}")
    poly = (f"(((8.05374449538e-2 * {z} - 1.38776856032e-1) * {z} + 1.99777106478e-1) * {z} "
            f"- 3.33329491539e-1) * {z} * {reduced} + {reduced}")
    magnitude = c.tmp(f"{offset} + {poly}")
    return f"tl.where({x} < 0, -{magnitude}, {magnitude})"


def _round(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0].text
    low = c.tmp(f"tl.floor({x})")
    frac = c.tmp(f"{x} - {low}")
    even = f"tl.where({low} % 2.0 == 0.0, {low}, {low} + 1.0)"
    return f"tl.where({frac} > 0.5, {low} + 1.0, tl.where({frac} < 0.5, {low}, {even}))"


def _sign(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0]
    if x.dtype.name == "i1":
        return x.text
    return f"(tl.where({x.text} > 0, 1, 0) - tl.where({x.text} < 0, 1, 0)).to({compute_type(x.dtype)})"


def _relu(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0]
    zero = "0.0" if x.dtype.is_float else "0"
    return f"tl.where({x.text} < 0, {zero}, {x.text})"  # keeps NaN and -0.0, like torch


def _extremum(fn: str, boolean: str) -> Emitter:
    def emit(c: Temporaries, a: list[Operand], op: Operation) -> str:
        x, y = a
        if x.dtype.name == "i1":
            return f"{x.text} {boolean} {y.text}"
        nan = f", {NAN_ALL}" if x.dtype.is_float else ""
        return f"{fn}({x.text}, {y.text}{nan})"

    return emit


def _clamp(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0]
    nan = f", {NAN_ALL}" if x.dtype.is_float else ""
    text = x.text
    if op.attributes.get("min") is not None:
        text = c.tmp(f"tl.maximum({text}, {literal(op.attributes['min'], x.dtype)}{nan})")
    if op.attributes.get("max") is not None:
        text = f"tl.minimum({text}, {literal(op.attributes['max'], x.dtype)}{nan})"
    return text


def _add(c: Temporaries, a: list[Operand], op: Operation) -> str:
    return f"{a[0].text} | {a[1].text}" if a[0].dtype.name == "i1" else f"{a[0].text} + {a[1].text}"


def _mul(c: Temporaries, a: list[Operand], op: Operation) -> str:
    return f"{a[0].text} & {a[1].text}" if a[0].dtype.name == "i1" else f"{a[0].text} * {a[1].text}"


def _div(c: Temporaries, a: list[Operand], op: Operation) -> str:
    # Triton's `//` on integers truncates toward zero, which is FTIR's integer division.
    return f"{a[0].text} / {a[1].text}" if a[0].dtype.is_float else f"{a[0].text} // {a[1].text}"


def _floordiv(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x, y = a[0].text, a[1].text
    if a[0].dtype.is_float:
        # torch's algorithm (c10 div_floor_floating): exact where floor(x / y) is off by one.
        rem = c.tmp(f"{x} % {y}")
        quotient = c.tmp(f"({x} - {rem}) / {y}")
        quotient = c.tmp(f"tl.where(({rem} != 0) & (({y} < 0) != ({rem} < 0)), {quotient} - 1.0, {quotient})")
        low = c.tmp(f"tl.floor({quotient})")
        rounded = f"tl.where({quotient} - {low} > 0.5, {low} + 1.0, {low})"
        result = c.tmp(f"tl.where({quotient} == 0, 0.0 * ({x} / {y}), {rounded})")
        return f"tl.where({y} == 0, {x} / {y}, {result})"
    quotient = c.tmp(f"{x} // {y}")
    inexact = f"({x} % {y} != 0) & (({x} < 0) != ({y} < 0))"
    return f"tl.where({inexact}, {quotient} - 1, {quotient})"


def _remainder(c: Temporaries, a: list[Operand], op: Operation) -> str:
    # `%` is C's fmod (sign of the dividend); Python's remainder takes the divisor's sign.
    x, y = a[0].text, a[1].text
    rem = c.tmp(f"{x} % {y}")
    return f"tl.where(({rem} != 0) & (({rem} < 0) != ({y} < 0)), {rem} + {y}, {rem})"


def _pow(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x, y = a
    small = y.is_constant and float(y.constant) == int(y.constant) and abs(int(y.constant)) <= 4
    if small and (int(y.constant) >= 0 or x.dtype.is_float):
        return _integer_power(x.text, int(y.constant), x.dtype)
    if not x.dtype.is_float:
        raise UnsupportedRegion("'ft.pow' of integers with a non-constant exponent has no Triton lowering")
    if y.is_constant and float(y.constant) == 0.5:  # pow(-inf, 0.5) is inf and pow(-0.0, 0.5) is +0.0
        root = c.tmp(_precise_sqrt(Operand(f"({x.text} + 0.0)", x.dtype)))
        return f'tl.where({x.text} == -float("inf"), float("inf"), {root})'
    magnitude = c.tmp(f"tl.exp2({y.text} * tl.log2(tl.abs({x.text})))")
    integral = c.tmp(f"tl.floor({y.text}) == {y.text}")
    odd = c.tmp(f"{integral} & (tl.abs({y.text} % 2.0) == 1.0)")
    signed = c.tmp(f"tl.where(({x.text} < 0) & {odd}, -{magnitude}, {magnitude})")
    finite_negative = f'({x.text} < 0) & ({x.text} != -float("inf"))'
    real = c.tmp(f'tl.where({finite_negative} & ({integral} == 0), float("nan"), {signed})')
    one = f'({y.text} == 0) | ({x.text} == 1) | (({x.text} == -1) & (tl.abs({y.text}) == float("inf")))'
    return f"tl.where({one}, 1.0, {real})"


def _integer_power(x: str, n: int, dtype: ScalarType) -> str:
    if n == 0:  # pow(nan, 0) is 1
        return f"tl.full([], 1, {compute_type(dtype)})"
    product = " * ".join([x] * abs(n))
    return f"1.0 / ({product})" if n < 0 else product


def _precise_sqrt(x: Operand) -> str:
    """A correctly rounded square root: tl.sqrt_rn takes f32 only; f64's tl.sqrt is already IEEE
    (sqrt.rn.f64), f32's is an approximation."""
    return f"tl.sqrt({x.text})" if x.dtype.name == "f64" else f"tl.sqrt_rn({x.text})"


def _sqrt(c: Temporaries, a: list[Operand], op: Operation) -> str:
    return _precise_sqrt(a[0])


def _rsqrt(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0]
    return f"tl.rsqrt({x.text})" if x.dtype.name != "f64" else f"1.0 / {_precise_sqrt(x)}"


def _gelu(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0].text
    if op.attributes.get("approximate", "none") == "tanh":
        inner = c.tmp(f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})")
        return f"0.5 * {x} * (1.0 + {c.tmp(_tanh_of(c, inner, a[0].dtype))})"
    return f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"


def _logical(symbol: str) -> Emitter:
    return lambda c, a, op: f"({a[0].text} != 0) {symbol} ({a[1].text} != 0)"


def _bitwise_not(c: Temporaries, a: list[Operand], op: Operation) -> str:
    return f"{a[0].text} == 0" if a[0].dtype.name == "i1" else f"~{a[0].text}"


def _isinf(c: Temporaries, a: list[Operand], op: Operation) -> str:
    x = a[0].text
    return f'tl.abs({x}) == float("inf")' if a[0].dtype.is_float else f"{x} != {x}"


# Their result is one of their operands' values, or an integer within 1 of one: a float type
# holds every integer up to where its spacing exceeds 1, and above that only integers.
_EXACT_IN_OPERAND_TYPE = frozenset({
    "ft.neg", "ft.abs", "ft.relu", "ft.sign", "ft.floor", "ft.ceil", "ft.trunc", "ft.round", "ft.where",
    "ft.maximum", "ft.minimum",
})

_EMITTERS: dict[str, Emitter] = {
    "ft.exp": _call("tl.exp"),
    "ft.exp2": _call("tl.exp2"),
    "ft.log": _call("tl.log"),
    "ft.log2": _call("tl.log2"),
    "ft.log1p": _log1p,
    "ft.expm1": _expm1,
    "ft.sqrt": _sqrt,
    "ft.rsqrt": _rsqrt,
    "ft.sin": _call("tl.sin"),
    "ft.cos": _call("tl.cos"),
    "ft.tan": lambda c, a, op: f"tl.sin({a[0].text}) / tl.cos({a[0].text})",
    "ft.tanh": _tanh,
    "ft.atan": _atan,
    "ft.sigmoid": _call("tl.sigmoid"),
    "ft.silu": lambda c, a, op: f"{a[0].text} / (1.0 + tl.exp(-{a[0].text}))",  # torch's formula: silu(-inf) = nan
    "ft.erf": _call("tl.erf"),
    "ft.gelu": _gelu,
    "ft.reciprocal": lambda c, a, op: f"1.0 / {a[0].text}",
    "ft.floor": _call("tl.floor"),
    "ft.ceil": _call("tl.ceil"),
    "ft.round": _round,
    "ft.trunc": lambda c, a, op: f"tl.where({a[0].text} < 0, tl.ceil({a[0].text}), tl.floor({a[0].text}))",
    "ft.neg": lambda c, a, op: f"-{a[0].text}",
    "ft.abs": _call("tl.abs"),
    "ft.sign": _sign,
    "ft.relu": _relu,
    "ft.bitwise_not": _bitwise_not,
    "ft.isnan": lambda c, a, op: f"{a[0].text} != {a[0].text}",
    "ft.isinf": _isinf,
    "ft.logical_not": lambda c, a, op: f"{a[0].text} == 0",
    "ft.add": _add,
    "ft.sub": _infix("-"),
    "ft.mul": _mul,
    "ft.div": _div,
    "ft.floordiv": _floordiv,
    "ft.remainder": _remainder,
    "ft.fmod": _infix("%"),
    "ft.pow": _pow,
    "ft.maximum": _extremum("tl.maximum", "|"),
    "ft.minimum": _extremum("tl.minimum", "&"),
    "ft.bitwise_and": _infix("&"),
    "ft.bitwise_or": _infix("|"),
    "ft.bitwise_xor": _infix("^"),
    "ft.eq": _infix("=="),
    "ft.ne": _infix("!="),
    "ft.lt": _infix("<"),
    "ft.le": _infix("<="),
    "ft.gt": _infix(">"),
    "ft.ge": _infix(">="),
    "ft.logical_and": _logical("&"),
    "ft.logical_or": _logical("|"),
    "ft.logical_xor": _logical("^"),
    "ft.where": lambda c, a, op: f"tl.where({a[0].text}, {a[1].text}, {a[2].text})",
    "ft.clamp": _clamp,
}

SUPPORTED_ELEMENTWISE = frozenset(_EMITTERS) | {"ft.cast"}
