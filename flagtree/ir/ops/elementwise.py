"""Elementwise ops: unary and binary math, comparisons, logic, where, clamp, cast.

Operands broadcast with NumPy rules.  Arithmetic ops take operands of the result's
element type (the importer makes type promotion explicit with `ft.cast`); comparisons
and logical ops return i1.  Scalar (non-tensor) operands are rank-0 and let the same
ops compute symbolic sizes on i64 values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.opdef import COMMUTATIVE, ELEMENTWISE, PURE, AttrSpec, OpDef, register
from flagtree.ir.ops._util import broadcast_or_error, elem_of, like, shape_of, torch_dtype
from flagtree.ir.types import I1, ScalarType, TensorType, Type


def _any_tensor(op: Operation) -> bool:
    return any(isinstance(v.type, TensorType) for v in op.operands)


def _infer_same(op: Operation) -> list[Type] | str:
    """Result has the operands' common element type and their broadcast shape."""
    types = [v.type for v in op.operands]
    dtypes = {elem_of(t) for t in types}
    if len(dtypes) != 1:
        return "operands must have one element type (insert ft.cast); got " + ", ".join(sorted(map(str, dtypes)))
    shape = broadcast_or_error(types)
    if isinstance(shape, str):
        return shape
    return [like(shape, dtypes.pop(), _any_tensor(op))]


def _infer_predicate(op: Operation) -> list[Type] | str:
    """Comparison: operands of one element type, i1 result."""
    inferred = _infer_same(op)
    if isinstance(inferred, str):
        return inferred
    return [like(shape_of(inferred[0]), I1, _any_tensor(op))]


def _infer_logical(op: Operation) -> list[Type] | str:
    shape = broadcast_or_error([v.type for v in op.operands])
    if isinstance(shape, str):
        return shape
    return [like(shape, I1, _any_tensor(op))]


def _infer_same_rejecting(rejects: Callable[[ScalarType], bool], message: str) -> Callable[..., list[Type] | str]:
    """`_infer_same`, plus `message` (formatted with `op` and `dtype`) for element types `rejects` flags."""

    def infer(op: Operation) -> list[Type] | str:
        inferred = _infer_same(op)
        if isinstance(inferred, str):
            return inferred
        dtype = elem_of(inferred[0])
        if rejects(dtype):
            return message.format(op=op.name, dtype=dtype)
        return inferred

    return infer


_infer_float = _infer_same_rejecting(lambda d: not d.is_float, "'{op}' needs floating-point operands, not {dtype}")
# Arithmetic torch does not define on booleans.
_infer_numeric = _infer_same_rejecting(
    lambda d: d == I1, "'{op}' is not defined on i1 (use the logical ops, or ft.cast to an integer type)")
_infer_bitwise = _infer_same_rejecting(lambda d: d.is_float, "'{op}' needs integer or i1 operands, not {dtype}")


def _as_tensor(x: Any, t: Type) -> Any:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch_dtype(t))


def _elementwise(fn: Callable[..., Any]) -> Callable[[list[Any], dict, list[Type]], Any]:
    def reference(args: list[Any], attrs: dict, result_types: list[Type]) -> Any:
        out = fn(*args, **attrs)
        if isinstance(result_types[0], TensorType):
            out = _as_tensor(out, result_types[0])
            if out.dtype != torch_dtype(result_types[0]):
                out = out.to(torch_dtype(result_types[0]))
        return out

    return reference


_UNARY_FLOAT: dict[str, tuple[Callable[..., Any], str]] = {
    "exp": (torch.exp, "e^x"),
    "exp2": (torch.exp2, "2^x"),
    "log": (torch.log, "natural logarithm"),
    "log2": (torch.log2, "base-2 logarithm"),
    "log1p": (torch.log1p, "log(1 + x)"),
    "expm1": (torch.expm1, "e^x - 1"),
    "sqrt": (torch.sqrt, "square root"),
    "rsqrt": (torch.rsqrt, "1 / sqrt(x)"),
    "sin": (torch.sin, "sine"),
    "cos": (torch.cos, "cosine"),
    "tan": (torch.tan, "tangent"),
    "tanh": (torch.tanh, "hyperbolic tangent"),
    "atan": (torch.atan, "arc tangent"),
    "sigmoid": (torch.sigmoid, "1 / (1 + e^-x)"),
    "silu": (torch.nn.functional.silu, "x * sigmoid(x)"),
    "erf": (torch.erf, "error function"),
    "reciprocal": (torch.reciprocal, "1 / x"),
    "floor": (torch.floor, "round toward -inf"),
    "ceil": (torch.ceil, "round toward +inf"),
    "round": (torch.round, "round half to even"),
    "trunc": (torch.trunc, "round toward zero"),
}
_UNARY_ANY: dict[str, tuple[Callable[..., Any], str, Callable[[Operation], list[Type] | str]]] = {
    "neg": (operator.neg, "-x", _infer_numeric),
    "abs": (abs, "|x|", _infer_numeric),
    "sign": (torch.sign, "-1, 0 or 1", _infer_same),
    "relu": (torch.relu, "max(x, 0)", _infer_numeric),
    "bitwise_not": (torch.bitwise_not, "bitwise (integers) or logical (i1) not", _infer_bitwise),
}
_PREDICATES_UNARY: dict[str, tuple[Callable[..., Any], str]] = {
    "isnan": (torch.isnan, "x is NaN"),
    "isinf": (torch.isinf, "x is ±inf"),
    "logical_not": (torch.logical_not, "x == 0"),
}


def _scalar_or_torch(torch_fn: Callable[..., Any], scalar_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Use Python arithmetic on Python scalars (symbolic sizes), torch on tensors."""

    def fn(*args: Any) -> Any:
        if any(isinstance(a, torch.Tensor) for a in args):
            return torch_fn(*args)
        return scalar_fn(*args)

    return fn


def _div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torch.div on integers is true division in float32, which loses int64 precision.
    both_integer = not (x.dtype.is_floating_point or y.dtype.is_floating_point)
    return torch.div(x, y, rounding_mode="trunc") if both_integer else torch.div(x, y)


def _scalar_div(x: Any, y: Any) -> Any:
    if isinstance(x, float) or isinstance(y, float):
        return x / y
    quotient = abs(x) // abs(y)
    return quotient if (x < 0) == (y < 0) else -quotient


def _scalar_fmod(x: Any, y: Any) -> Any:
    # math.fmod returns a float even for the integer sizes this path computes.
    if isinstance(x, float) or isinstance(y, float):
        return math.fmod(x, y)
    return x - y * _scalar_div(x, y)


_BINARY: dict[str, tuple[Callable[..., Any], str, frozenset[str], Callable[[Operation], list[Type] | str]]] = {
    "add": (operator.add, "x + y", frozenset({COMMUTATIVE}), _infer_same),
    "sub": (operator.sub, "x - y", frozenset(), _infer_numeric),
    "mul": (operator.mul, "x * y", frozenset({COMMUTATIVE}), _infer_same),
    "div": (_scalar_or_torch(_div, _scalar_div), "x / y (true division; integers: truncating)",
            frozenset(), _infer_numeric),
    "floordiv": (_scalar_or_torch(lambda a, b: torch.div(a, b, rounding_mode="floor"), operator.floordiv),
                 "floor(x / y)", frozenset(), _infer_numeric),
    "remainder": (_scalar_or_torch(torch.remainder, operator.mod), "x - floor(x / y) * y (Python %)",
                  frozenset(), _infer_numeric),
    "fmod": (_scalar_or_torch(torch.fmod, _scalar_fmod), "C fmod: remainder with the sign of x", frozenset(),
             _infer_numeric),
    "pow": (_scalar_or_torch(torch.pow, operator.pow), "x ** y", frozenset(), _infer_numeric),
    "maximum": (_scalar_or_torch(torch.maximum, max), "max(x, y), NaN-propagating", frozenset({COMMUTATIVE}),
                _infer_same),
    "minimum": (_scalar_or_torch(torch.minimum, min), "min(x, y), NaN-propagating", frozenset({COMMUTATIVE}),
                _infer_same),
    "atan2": (torch.atan2, "atan2(x, y)", frozenset(), _infer_float),
    "bitwise_and": (operator.and_, "x & y", frozenset({COMMUTATIVE}), _infer_bitwise),
    "bitwise_or": (operator.or_, "x | y", frozenset({COMMUTATIVE}), _infer_bitwise),
    "bitwise_xor": (operator.xor, "x ^ y", frozenset({COMMUTATIVE}), _infer_bitwise),
}
_COMPARISONS: dict[str, tuple[Callable[..., Any], str, frozenset[str]]] = {
    "eq": (operator.eq, "x == y", frozenset({COMMUTATIVE})),
    "ne": (operator.ne, "x != y", frozenset({COMMUTATIVE})),
    "lt": (operator.lt, "x < y", frozenset()),
    "le": (operator.le, "x <= y", frozenset()),
    "gt": (operator.gt, "x > y", frozenset()),
    "ge": (operator.ge, "x >= y", frozenset()),
}
_LOGICAL: dict[str, tuple[Callable[..., Any], str, frozenset[str]]] = {
    "logical_and": (torch.logical_and, "x != 0 and y != 0", frozenset({COMMUTATIVE})),
    "logical_or": (torch.logical_or, "x != 0 or y != 0", frozenset({COMMUTATIVE})),
    "logical_xor": (torch.logical_xor, "(x != 0) xor (y != 0)", frozenset({COMMUTATIVE})),
}

_EW = frozenset({PURE, ELEMENTWISE})

for _name, (_fn, _doc) in _UNARY_FLOAT.items():
    register(OpDef(f"ft.{_name}", _doc, (1, 1), infer=_infer_float, reference=_elementwise(_fn), traits=_EW))
for _name, (_fn, _doc, _infer) in _UNARY_ANY.items():
    register(OpDef(f"ft.{_name}", _doc, (1, 1), infer=_infer, reference=_elementwise(_fn), traits=_EW))
for _name, (_fn, _doc) in _PREDICATES_UNARY.items():
    register(OpDef(f"ft.{_name}", _doc, (1, 1), infer=_infer_logical, reference=_elementwise(_fn), traits=_EW))
for _name, (_fn, _doc, _traits, _infer) in _BINARY.items():
    register(OpDef(f"ft.{_name}", _doc, (2, 2), infer=_infer, reference=_elementwise(_fn), traits=_EW | _traits))
for _name, (_fn, _doc, _traits) in _COMPARISONS.items():
    register(OpDef(f"ft.{_name}", _doc, (2, 2), infer=_infer_predicate, reference=_elementwise(_fn),
                   traits=_EW | _traits))
for _name, (_fn, _doc, _traits) in _LOGICAL.items():
    register(OpDef(f"ft.{_name}", _doc, (2, 2), infer=_infer_logical, reference=_elementwise(_fn),
                   traits=_EW | _traits))


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate=approximate)


register(OpDef(
    "ft.gelu", "Gaussian error linear unit; approximate = \"none\" (erf) or \"tanh\"", (1, 1),
    attrs={"approximate": AttrSpec((str,), '"none" or "tanh"', required=False)},
    infer=_infer_float, reference=_elementwise(_gelu), traits=_EW,
))


def _infer_where(op: Operation) -> list[Type] | str:
    cond, a, b = (v.type for v in op.operands)
    if elem_of(cond) != I1:
        return f"the condition must be i1, not {elem_of(cond)}"
    if elem_of(a) != elem_of(b):
        return f"both branches must have one element type; got {elem_of(a)} and {elem_of(b)}"
    shape = broadcast_or_error([cond, a, b])
    if isinstance(shape, str):
        return shape
    return [like(shape, elem_of(a), _any_tensor(op))]


register(OpDef("ft.where", "cond ? x : y", (3, 3), infer=_infer_where,
               reference=_elementwise(torch.where), traits=_EW, operand_doc="cond (i1), x, y"))


def _clamp(x: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    if min is None and max is None:  # torch.clamp rejects this; both bounds missing is the identity
        return x
    return torch.clamp(x, min=min, max=max)


register(OpDef(
    "ft.clamp", "min(max(x, min), max); a missing bound is unbounded", (1, 1),
    attrs={
        "min": AttrSpec((int, float), "lower bound", required=False),
        "max": AttrSpec((int, float), "upper bound", required=False),
    },
    infer=_infer_same, reference=_elementwise(_clamp), traits=_EW,
))


def _infer_cast(op: Operation) -> list[Type] | str:
    source = op.operands[0].type
    target = op.results[0].type if op.results else None
    if target is None or shape_of(source) != shape_of(target) or isinstance(source, TensorType) != isinstance(
        target, TensorType
    ):
        return f"cast keeps the shape: {source} cannot become {target}"
    return [target]


def _cast(args: list[Any], attrs: dict, result_types: list[Type]) -> Any:
    (x,) = args
    if not isinstance(x, torch.Tensor):
        return float(x) if elem_of(result_types[0]).is_float else int(x)
    return x.to(torch_dtype(result_types[0]))


register(OpDef("ft.cast", "convert to the result's element type (round to nearest even)", (1, 1),
               infer=_infer_cast, reference=_cast, traits=_EW))
