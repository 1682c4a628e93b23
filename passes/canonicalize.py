"""canonicalize: rewrite ops to one canonical spelling, to a fixed point.

Fusion patterns are written once, against these forms.  Every rewrite is exact (bit for
bit, NaN, ±inf and the sign of zero included) unless marked *inexact*.  "c" is a constant
whose elements all equal the given value; a rewrite that drops `op(x, c)` applies only
when the result has x's type, so a constant that broadcasts x to a larger shape stays.

Algebra
  1. `op(c, x)` → `op(x, c)` for commutative ops: constants go right.  Not for
     maximum/minimum when c may hold a zero: torch returns their first operand when
     comparing -0.0 with +0.0, so swapping would change the sign of a zero result.
  2. `x + (-0.0)` → x;  `x - (+0.0)` → x;  integers: `x + 0`, `x - 0` → x.
     (`x + (+0.0)` stays: it turns -0.0 into +0.0.)
  3. `x * 1` → x;  `x / 1` → x (floats);  `x ** 1` → x.
  4. `neg(neg(x))` → x.
  5. `x ** 2` → `x * x`.  *Inexact*: the tensor-exponent pow may be 1 ulp off x * x
     (eager torch computes `x ** 2` as x * x).
  6. `x ** 0.5` → `sqrt(x)` (floats).  *Inexact*: pow may be 1 ulp off, and at x = -0.0 and
     x = -inf sqrt gives -0.0 and NaN where pow gives +0.0 and +inf — the values eager
     torch gives for `x ** 0.5`, which it computes as sqrt.
  7. `reciprocal(sqrt(x))` → `rsqrt(x)`.  *Inexact*: rsqrt may differ by rounding.
  8. `cast(x)` to x's own type → x;  `cast(cast(x, T), type(x))` → x when T holds every
     value of x's type exactly (bf16→f32→bf16, f32→f64→f32, i8→i32→i8; not f32→bf16→f32).
Normal forms
  9. `x * (-1)` → `neg(x)`.
 10. `x / c` → `x * (1/c)` when c = ±2^k and 1/c is a normal number of the float type
     (both round the same exact product).
 11. `maximum(x, +0.0)` (integers: 0; not i1) → `relu(x)`.
 12. `where(logical_not(c), y, x)` → `where(c, x, y)`.
Shapes
 13. `reshape(x)` to x's type → x (at most one dynamic dim: the element count fixes it).
 14. `reshape(reshape(x))` → `reshape(x)`.
 15. `transpose(x)` with the identity permutation → x;
     `transpose(transpose(x, p), q)` → `transpose(x, [p[q[i]] for i])`;
     a transpose that only moves dims of size 1 → `reshape(x)` (same element order);
     `transpose(broadcast_to(x))` → `broadcast_to(transpose(x))` when x has the result's
     rank and no other use (the transpose moves the smaller tensor, and meets x's own
     transposes, which then cancel).
 16. `broadcast_to(x)` to x's own static type → x.
 17. `slice(x)` selecting the whole dim (step 1) → x.
 18. `concat(x)` of one operand → x.

`x - c` stays (no rewrite that is not exact is invented).  Ops a rewrite leaves unused
are erased; other dead code is dce's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from flagtree.errors import OptionsError
from flagtree.ir.builder import Builder
from flagtree.ir.core import Module, Operation, OpResult, Value
from flagtree.ir.opdef import COMMUTATIVE, has_trait
from flagtree.ir.types import I1, ScalarType, TensorType
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import (
    PatternSet,
    apply_patterns,
    constant,
    dense_representable,
    element_type,
    is_constant,
    is_splat_of,
    may_contain_zero,
    replace_op,
    splat,
)

# A slice `end` at or past the largest int64 reaches the end of a dim of any size.
_INT64_MAX = 2**63 - 1
PATTERNS = PatternSet()


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Rewrite ops to canonical forms (list in passes/canonicalize.py) until nothing changes."""

    name: ClassVar[str] = "canonicalize"
    max_iterations: int = 10

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise OptionsError(f"pass 'canonicalize': max-iterations must be at least 1, not {self.max_iterations}")

    def run(self, module: Module) -> bool:
        return apply_patterns(module, PATTERNS, self.max_iterations)


def _producer(value: Value, name: str) -> Operation | None:
    """The op defining `value` if it is named `name`."""
    return value.op if isinstance(value, OpResult) and value.op.name == name else None


def _is_float(value: Value) -> bool:
    return element_type(value.type).is_float


def _replace_with_new(op: Operation, name: str, *operands: Value, **attributes: object) -> bool:
    """Replace `op` by a new op `name` on `operands` with `op`'s result type; returns True so
    that a pattern can end with `return _replace_with_new(...)`."""
    new = Builder.before_op(op).value(name, *operands, result_type=op.result.type, **attributes)
    replace_op(op, [new])
    return True


# ----------------------------------------------------------------------------- algebra

# torch's maximum/minimum return their first operand when comparing -0.0 with +0.0.
_ZERO_ORDER_SENSITIVE = frozenset({"ft.maximum", "ft.minimum"})


@PATTERNS.pattern()
def constant_to_right(op: Operation) -> bool:
    if not has_trait(op, COMMUTATIVE) or len(op.operands) != 2:
        return False
    lhs, rhs = op.operands
    if not is_constant(lhs) or is_constant(rhs):
        return False
    if op.name in _ZERO_ORDER_SENSITIVE and may_contain_zero(lhs):
        return False
    op.set_operand(0, rhs)
    op.set_operand(1, lhs)
    return True


# op → (float identity, integer identity) when the constant is the right operand.
_RIGHT_IDENTITIES: dict[str, tuple[float | None, int | None]] = {
    "ft.add": (-0.0, 0),
    "ft.sub": (0.0, 0),
    "ft.mul": (1.0, 1),
    # Integer division goes through floating point in the reference, so x / 1 is not x for huge x.
    "ft.div": (1.0, None),
    "ft.pow": (1.0, 1),
}


@PATTERNS.pattern(*_RIGHT_IDENTITIES)
def drop_right_identity(op: Operation) -> bool:
    x, c = op.operands
    float_identity, int_identity = _RIGHT_IDENTITIES[op.name]
    identity = float_identity if _is_float(x) else int_identity
    if identity is None or op.result.type != x.type or not is_splat_of(c, identity):
        return False
    replace_op(op, [x])
    return True


@PATTERNS.pattern("ft.neg")
def double_negation(op: Operation) -> bool:
    inner = _producer(op.operands[0], "ft.neg")
    if inner is None:
        return False
    replace_op(op, [inner.operands[0]])
    return True


@PATTERNS.pattern("ft.pow")
def square_to_multiply(op: Operation) -> bool:
    x, c = op.operands
    if op.result.type != x.type or not is_splat_of(c, 2.0 if _is_float(x) else 2):
        return False
    return _replace_with_new(op, "ft.mul", x, x)


@PATTERNS.pattern("ft.pow")
def half_power_to_sqrt(op: Operation) -> bool:
    x, c = op.operands
    if not _is_float(x) or op.result.type != x.type or not is_splat_of(c, 0.5):
        return False
    return _replace_with_new(op, "ft.sqrt", x)


@PATTERNS.pattern("ft.reciprocal")
def reciprocal_sqrt(op: Operation) -> bool:
    root = _producer(op.operands[0], "ft.sqrt")
    if root is None:
        return False
    return _replace_with_new(op, "ft.rsqrt", root.operands[0])


@PATTERNS.pattern("ft.cast")
def cast_to_same_type(op: Operation) -> bool:
    if op.operands[0].type != op.result.type:
        return False
    replace_op(op, [op.operands[0]])
    return True


@PATTERNS.pattern("ft.cast")
def exact_cast_round_trip(op: Operation) -> bool:
    inner = _producer(op.operands[0], "ft.cast")
    if inner is None:
        return False
    x = inner.operands[0]
    if x.type != op.result.type or not holds_exactly(element_type(inner.result.type), element_type(x.type)):
        return False
    replace_op(op, [x])
    return True


@dataclass(frozen=True)
class _FloatFormat:
    digits: int  # significand bits, the implicit bit included
    max_exponent: int  # of the largest finite value
    min_exponent: int  # of the smallest normal value
    has_inf: bool
    has_nan: bool
    signed: bool  # has negative values and zero (f8E8M0FNU has neither)

    @property
    def lowest_bit_exponent(self) -> int:
        """The exponent of the smallest subnormal: no value has a lower set bit."""
        return self.min_exponent - (self.digits - 1)


_FLOAT_FORMATS = {
    "f64": _FloatFormat(53, 1023, -1022, True, True, True),
    "f32": _FloatFormat(24, 127, -126, True, True, True),
    "f16": _FloatFormat(11, 15, -14, True, True, True),
    "bf16": _FloatFormat(8, 127, -126, True, True, True),
    "f8E4M3FN": _FloatFormat(4, 8, -6, False, True, True),
    "f8E5M2": _FloatFormat(3, 15, -14, True, True, True),
    "f8E8M0FNU": _FloatFormat(1, 127, -127, False, True, False),
    "f4E2M1FN": _FloatFormat(2, 2, 0, False, False, True),
}
_INTEGER_RANGES = {
    "i1": (0, 1), "i8": (-(2**7), 2**7 - 1), "i16": (-(2**15), 2**15 - 1), "i32": (-(2**31), 2**31 - 1),
    "i64": (-(2**63), 2**63 - 1), "ui8": (0, 255),
}


def holds_exactly(wide: ScalarType, narrow: ScalarType) -> bool:
    """Whether every value of `narrow` (±inf and NaN included) converts to `wide` exactly."""
    if wide == narrow:
        return True
    if wide.is_integer:
        return narrow.is_integer and _integer_range_within(narrow, wide)
    w = _FLOAT_FORMATS[wide.name]
    if narrow.is_integer:
        low, high = _INTEGER_RANGES[narrow.name]
        # Every integer of magnitude up to 2^digits is exact in a float with that many digits.
        return w.signed and max(-low, high) <= 2**w.digits
    n = _FLOAT_FORMATS[narrow.name]
    return (w.digits >= n.digits and w.max_exponent >= n.max_exponent
            and w.lowest_bit_exponent <= n.lowest_bit_exponent
            and (w.has_inf or not n.has_inf) and (w.has_nan or not n.has_nan) and (w.signed or not n.signed))


def _integer_range_within(narrow: ScalarType, wide: ScalarType) -> bool:
    low, high = _INTEGER_RANGES[narrow.name]
    wide_low, wide_high = _INTEGER_RANGES[wide.name]
    return wide_low <= low and high <= wide_high


# ---------------------------------------------------------------------------- normal forms


@PATTERNS.pattern("ft.mul")
def multiply_by_minus_one(op: Operation) -> bool:
    x, c = op.operands
    if op.result.type != x.type or not is_splat_of(c, -1.0 if _is_float(x) else -1):
        return False
    return _replace_with_new(op, "ft.neg", x)


@PATTERNS.pattern("ft.div")
def divide_by_power_of_two(op: Operation) -> bool:
    x, c = op.operands
    dtype = element_type(x.type)
    divisor = splat(c)
    if not dtype.is_float or not dense_representable(dtype) or not isinstance(divisor, float):
        return False
    inverse = _exact_normal_inverse(divisor, dtype)
    if inverse is None:
        return False
    return _replace_with_new(op, "ft.mul", x, constant(Builder.before_op(op), c.type, inverse))


def _exact_normal_inverse(divisor: float, dtype: ScalarType) -> float | None:
    """1/divisor when divisor is ±2^k and 1/divisor is a normal number of `dtype`."""
    if not math.isfinite(divisor) or divisor == 0 or abs(math.frexp(divisor)[0]) != 0.5:
        return None
    inverse = 1.0 / divisor
    rounded = torch.tensor(inverse, dtype=torch.float64).to(dtype.torch_dtype).double().item()
    info = torch.finfo(dtype.torch_dtype)
    if rounded != inverse or not info.tiny <= abs(inverse) <= info.max:
        return None
    return inverse


@PATTERNS.pattern("ft.maximum")
def maximum_with_zero_to_relu(op: Operation) -> bool:
    x, c = op.operands
    if element_type(x.type) == I1 or op.result.type != x.type or not is_splat_of(c, 0.0 if _is_float(x) else 0):
        return False
    return _replace_with_new(op, "ft.relu", x)


@PATTERNS.pattern("ft.where")
def where_of_negated_condition(op: Operation) -> bool:
    condition, if_true, if_false = op.operands
    negation = _producer(condition, "ft.logical_not")
    if negation is None or element_type(negation.operands[0].type) != I1:
        return False
    return _replace_with_new(op, "ft.where", negation.operands[0], if_false, if_true)


# ---------------------------------------------------------------------------------- shapes


@PATTERNS.pattern("ft.reshape")
def reshape_to_same_type(op: Operation) -> bool:
    x = op.operands[0]
    if x.type != op.result.type or sum(d is None for d in x.type.shape) > 1:
        return False
    replace_op(op, [x])
    return True


@PATTERNS.pattern("ft.reshape")
def reshape_of_reshape(op: Operation) -> bool:
    inner = _producer(op.operands[0], "ft.reshape")
    if inner is None:
        return False
    return _replace_with_new(op, "ft.reshape", inner.operands[0], *op.operands[1:])


@PATTERNS.pattern("ft.transpose")
def identity_transpose(op: Operation) -> bool:
    if op.attributes["perm"] != tuple(range(len(op.attributes["perm"]))):
        return False
    replace_op(op, [op.operands[0]])
    return True


@PATTERNS.pattern("ft.transpose")
def transpose_of_transpose(op: Operation) -> bool:
    inner = _producer(op.operands[0], "ft.transpose")
    if inner is None:
        return False
    first, second = inner.attributes["perm"], op.attributes["perm"]
    return _replace_with_new(op, "ft.transpose", inner.operands[0], perm=tuple(first[p] for p in second))


@PATTERNS.pattern("ft.transpose")
def transpose_of_unit_dims(op: Operation) -> bool:
    x = op.operands[0]
    perm = op.attributes["perm"]
    moved = [p for p in perm if x.type.shape[p] != 1]
    if moved != sorted(moved) or list(perm) == sorted(perm):
        return False
    builder = Builder.before_op(op)
    sizes = [builder.value("ft.dim", x, dim=p) for p in perm if x.type.shape[p] is None]
    return _replace_with_new(op, "ft.reshape", x, *sizes)


@PATTERNS.pattern("ft.transpose")
def transpose_of_broadcast(op: Operation) -> bool:
    broadcast = _producer(op.operands[0], "ft.broadcast_to")
    if broadcast is None or len(broadcast.result.uses) != 1 or broadcast.operands[0].type.rank != op.result.type.rank:
        return False
    perm = op.attributes["perm"]
    sizes = dict(zip([d for d, size in enumerate(broadcast.result.type.shape) if size is None], broadcast.operands[1:]))
    builder = Builder.before_op(op)
    moved = builder.value("ft.transpose", broadcast.operands[0], perm=perm)
    return _replace_with_new(op, "ft.broadcast_to", moved, *(sizes[p] for p in perm if p in sizes))


@PATTERNS.pattern("ft.broadcast_to")
def broadcast_to_same_type(op: Operation) -> bool:
    x = op.operands[0]
    if x.type != op.result.type or not x.type.is_static:
        return False
    replace_op(op, [x])
    return True


@PATTERNS.pattern("ft.slice")
def full_slice(op: Operation) -> bool:
    x = op.operands[0]
    if x.type != op.result.type or not _selects_whole_dim(x.type, op.attributes):
        return False
    replace_op(op, [x])
    return True


def _selects_whole_dim(x: TensorType, attrs: dict) -> bool:
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    size = x.shape[attrs["dim"]]
    if size is None:
        return start == 0 and step == 1 and end >= _INT64_MAX
    return step == 1 and range(*slice(start, end, step).indices(size)) == range(size)


@PATTERNS.pattern("ft.concat")
def concat_of_one(op: Operation) -> bool:
    if len(op.operands) != 1 or op.operands[0].type != op.result.type:
        return False
    replace_op(op, [op.operands[0]])
    return True
