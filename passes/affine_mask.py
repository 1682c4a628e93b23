"""Symbolic sizes and the exact analysis of attention masks built from index arithmetic.

fuse-attention must know, not guess, which keys a mask lets each query see.  A mask such
as `triu(ones(S, S), 1)` or `arange(S)[None, :] <= arange(S)[:, None] + (Skv - Sq)`
imports as `ft.iota`, reshapes and comparisons; this module evaluates such a graph
symbolically:

- `Size`: an integer polynomial over opaque symbols (an i64 SSA value, or a dim no op
  names), so `Skv - Sq` in a dynamic graph is an expression that can equal another
  exactly.  `Sizes` reads a tensor dim or an i64 value as a Size.
- `Affine`: an integer tensor whose element at index (..., i, j) is Σ a_k·idx_k + c, the
  coefficients keyed by axis counted from the right (0 = last axis, the key j; 1 = the
  row i; 2 and up = batch axes) and the constant a Size.
- A boolean mask becomes a disjunction of conjunctions of half-planes `affine >= 0`
  (comparisons of affine values are half-planes over the integers; and/or/not combine
  them).
- `classify` decides whether a conjunction over the rows i < Sq and keys j < Skv is
  exactly ft.attention's visibility rule: j <= i + offset with offset 0 ("upper_left")
  or Skv - Sq ("lower_right"), and optionally j > i + offset - window.  Anything it cannot
  prove equal to such a rule is left to the caller as a general mask tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch

from flagtree.ir.builder import Builder
from flagtree.ir.core import OpResult, Value
from flagtree.ir.opdef import ELEMENTWISE, has_trait
from flagtree.ir.types import I64, ScalarType, TensorType
from flagtree.passes.rewrite import fill_value

# More conjunctions than this in a mask's normal form is no mask fuse-attention can express.
_MAX_CONJUNCTIONS = 16


# ------------------------------------------------------------------------ symbolic sizes


@dataclass(frozen=True, eq=False)
class Symbol:
    """An opaque size: the i64 SSA `value` itself (axis None), or dim `axis` of the tensor `value`."""

    value: Value
    axis: int | None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Symbol) and other.value is self.value and other.axis == self.axis

    def __hash__(self) -> int:
        return hash((id(self.value), self.axis))

    def sort_key(self) -> tuple[int, int]:
        return id(self.value), -1 if self.axis is None else self.axis


Monomial = tuple[Symbol, ...]


def _monomial_key(monomial: Monomial) -> tuple:
    return tuple(s.sort_key() for s in monomial)


@dataclass(frozen=True)
class Size:
    """Σ coefficient · Π symbols, normalised (sorted monomials, no zero coefficients), so
    two sizes are equal exactly when their dataclass fields are."""

    terms: tuple[tuple[Monomial, int], ...] = ()

    @staticmethod
    def of(number: int) -> Size:
        return Size((((), number),)) if number else Size()

    @staticmethod
    def symbol(symbol: Symbol) -> Size:
        return Size((((symbol,), 1),))

    @staticmethod
    def _normalised(terms: dict[Monomial, int]) -> Size:
        kept = [(m, c) for m, c in terms.items() if c]
        return Size(tuple(sorted(kept, key=lambda t: _monomial_key(t[0]))))

    def __add__(self, other: Size) -> Size:
        terms = dict(self.terms)
        for monomial, coefficient in other.terms:
            terms[monomial] = terms.get(monomial, 0) + coefficient
        return Size._normalised(terms)

    def __neg__(self) -> Size:
        return Size(tuple((m, -c) for m, c in self.terms))

    def __sub__(self, other: Size) -> Size:
        return self + (-other)

    def __mul__(self, other: Size) -> Size:
        terms: dict[Monomial, int] = {}
        for (m1, c1), (m2, c2) in product(self.terms, other.terms):
            monomial = tuple(sorted(m1 + m2, key=Symbol.sort_key))
            terms[monomial] = terms.get(monomial, 0) + c1 * c2
        return Size._normalised(terms)

    def scaled(self, factor: int) -> Size:
        return self * Size.of(factor)

    @property
    def constant(self) -> int | None:
        """The value when no symbol occurs, else None."""
        if not self.terms:
            return 0
        if len(self.terms) == 1 and not self.terms[0][0]:
            return self.terms[0][1]
        return None

    @property
    def is_one(self) -> bool:
        return self.constant == 1

    def exact_div(self, divisor: Size) -> Size | None:
        """self / divisor when the divisor is one term dividing every term exactly, else None."""
        if len(divisor.terms) != 1:
            return None
        (dm, dc), = divisor.terms
        quotient: dict[Monomial, int] = {}
        for monomial, coefficient in self.terms:
            rest = list(monomial)
            for symbol in dm:
                if symbol not in rest:
                    return None
                rest.remove(symbol)
            if coefficient % dc:
                return None
            quotient[tuple(rest)] = coefficient // dc
        return Size._normalised(quotient)

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for monomial, coefficient in self.terms:
            names = "*".join(_symbol_name(s) for s in monomial)
            parts.append(names if coefficient == 1 and names else f"{coefficient}{'*' + names if names else ''}")
        return " + ".join(parts)


def _symbol_name(symbol: Symbol) -> str:
    return f"dim{symbol.axis}" if symbol.axis is not None else "s"


def product_of(sizes: list[Size]) -> Size:
    total = Size.of(1)
    for size in sizes:
        total = total * size
    return total


def is_unit(size: Size) -> bool:
    return size.is_one


# Ops whose result takes its dynamic dims from i64 operands, and the first such operand.
_SIZED_OPS = {"ft.reshape": 1, "ft.broadcast_to": 1, "ft.full": 0, "ft.iota": 0}


class Sizes:
    """Reads tensor dims and i64 values as Sizes (memoised; create one per pass run)."""

    def __init__(self) -> None:
        self._dims: dict[tuple[int, int], Size] = {}

    def shape(self, value: Value) -> list[Size]:
        return [self.dim(value, axis) for axis in range(value.type.rank)]

    def dim(self, value: Value, axis: int) -> Size:
        """Dim `axis` of the tensor `value`."""
        shape = value.type.shape
        axis %= len(shape)
        if shape[axis] is not None:
            return Size.of(shape[axis])
        key = (id(value), axis)
        if key not in self._dims:
            found = self._dim_from_producer(value, axis) if isinstance(value, OpResult) else None
            self._dims[key] = found if found is not None else Size.symbol(Symbol(value, axis))
        return self._dims[key]

    def scalar(self, value: Value) -> Size:
        """The i64 `value` as a Size."""
        if not isinstance(value, OpResult):
            return Size.symbol(Symbol(value, None))
        op = value.op
        if op.name == "ft.constant" and isinstance(op.attributes["value"], int) and value.type == I64:
            return Size.of(op.attributes["value"])
        if op.name == "ft.dim":
            return self.dim(op.operands[0], op.attributes["dim"])
        if op.name in ("ft.add", "ft.sub", "ft.mul") and all(o.type == I64 for o in op.operands):
            lhs, rhs = (self.scalar(o) for o in op.operands)
            return {"ft.add": lhs + rhs, "ft.sub": lhs - rhs, "ft.mul": lhs * rhs}[op.name]
        if op.name == "ft.neg" and value.type == I64:
            return -self.scalar(op.operands[0])
        return Size.symbol(Symbol(value, None))

    def _dim_from_producer(self, value: OpResult, axis: int) -> Size | None:
        op = value.op
        rank = value.type.rank
        if op.name in _SIZED_OPS:
            position = sum(d is None for d in value.type.shape[:axis])
            return self.scalar(op.operands[_SIZED_OPS[op.name] + position])
        if op.name == "ft.transpose":
            return self.dim(op.operands[0], op.attributes["perm"][axis])
        if op.name == "ft.matmul":
            lhs, rhs = op.operands
            if axis == rank - 2:
                return self.dim(lhs, -2)
            if axis == rank - 1:
                return self.dim(rhs, -1)
            return self._broadcast_dim([lhs, rhs], axis - rank + 2, 2)
        if op.name == "ft.attention":
            q, v = op.operands[0], op.operands[2]
            return self.dim(v, 3) if axis == 3 else self.dim(q, axis)
        if has_trait(op, ELEMENTWISE) or op.name == "ft.softmax":
            return self._broadcast_dim(list(op.operands), axis - rank, 0)
        return None

    def _broadcast_dim(self, operands: list[Value], from_right: int, trailing: int) -> Size | None:
        """The size of a broadcast result dim (`from_right` < 0, counted before the last
        `trailing` dims): the one size every operand with a dynamic dim there agrees on."""
        found: set[Size] = set()
        for operand in operands:
            if not isinstance(operand.type, TensorType):
                continue
            position = operand.type.rank - trailing + from_right
            if position < 0:
                continue
            size = self.dim(operand, position)
            if not is_unit(size):
                found.add(size)
        return found.pop() if len(found) == 1 else None


def materialize(size: Size, builder: Builder, cache: dict[Size, Value]) -> Value:
    """An i64 SSA value computing `size`, built with `builder` (reusing `cache`)."""
    if size in cache:
        return cache[size]
    total: Value | None = None
    for monomial, coefficient in size.terms:
        term = _materialize_monomial(monomial, coefficient, builder)
        total = term if total is None else builder.value("ft.add", total, term)
    if total is None:
        total = builder.value("ft.constant", result_type=I64, value=0)
    cache[size] = total
    return total


def _materialize_monomial(monomial: Monomial, coefficient: int, builder: Builder) -> Value:
    factors = [_materialize_symbol(s, builder) for s in monomial]
    if coefficient != 1 or not factors:
        factors.append(builder.value("ft.constant", result_type=I64, value=coefficient))
    value = factors[0]
    for factor in factors[1:]:
        value = builder.value("ft.mul", value, factor)
    return value


def _materialize_symbol(symbol: Symbol, builder: Builder) -> Value:
    if symbol.axis is None:
        return symbol.value
    return builder.value("ft.dim", symbol.value, dim=symbol.axis)


# -------------------------------------------------------------------------- affine forms


@dataclass(frozen=True)
class Affine:
    """Σ coefficient · index[axis] + constant; `coefficients` holds (axis from the right,
    nonzero coefficient) pairs, sorted."""

    coefficients: tuple[tuple[int, int], ...]
    constant: Size

    @staticmethod
    def const(size: Size) -> Affine:
        return Affine((), size)

    def coefficient(self, axis: int) -> int:
        return dict(self.coefficients).get(axis, 0)

    def __add__(self, other: Affine) -> Affine:
        merged = dict(self.coefficients)
        for axis, c in other.coefficients:
            merged[axis] = merged.get(axis, 0) + c
        return Affine(_sorted_nonzero(merged), self.constant + other.constant)

    def scaled(self, factor: int) -> Affine:
        return Affine(_sorted_nonzero({a: c * factor for a, c in self.coefficients}), self.constant.scaled(factor))

    def __sub__(self, other: Affine) -> Affine:
        return self + other.scaled(-1)

    def remapped(self, axes: dict[int, int | None]) -> Affine | None:
        """The same form on a view of the tensor: axis k becomes axes[k] (None: a unit
        axis, whose index is always 0); None if some axis has no image."""
        moved: dict[int, int] = {}
        for axis, c in self.coefficients:
            if axis not in axes:
                return None
            if axes[axis] is not None:
                moved[axes[axis]] = c
        return Affine(_sorted_nonzero(moved), self.constant)


def _sorted_nonzero(coefficients: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((a, c) for a, c in coefficients.items() if c))


# A half-plane `affine >= 0`; a conjunction of them; a disjunction of conjunctions.
Conjunction = frozenset[Affine]
Formula = frozenset[Conjunction]
TRUE: Formula = frozenset({frozenset()})
FALSE: Formula = frozenset()


def _half_plane(form: Affine) -> Formula:
    constant = form.constant.constant
    if not form.coefficients and constant is not None:
        return TRUE if constant >= 0 else FALSE
    return frozenset({frozenset({form})})


def conjoin(a: Formula, b: Formula) -> Formula | None:
    result = frozenset(x | y for x in a for y in b)
    return result if len(result) <= _MAX_CONJUNCTIONS else None


def negate(formula: Formula) -> Formula | None:
    # ¬(∨ ∧ h) = ∧ ∨ ¬h, and over the integers ¬(a >= 0) is (-a - 1 >= 0).
    result: Formula | None = TRUE
    for conjunction in formula:
        negated = frozenset().union(*(_half_plane(h.scaled(-1) - Affine.const(Size.of(1))) for h in conjunction))
        result = conjoin(result, negated)
        if result is None:
            return None
    return result


def map_formula(formula: Formula, axes: dict[int, int | None]) -> Formula | None:
    result = set()
    for conjunction in formula:
        moved = [h.remapped(axes) for h in conjunction]
        if any(h is None for h in moved):
            return None
        combined: Formula | None = TRUE
        for h in moved:
            combined = conjoin(combined, _half_plane(h))
        result |= combined
    return frozenset(result)


# ------------------------------------------------------------------------------- analysis


class MaskAnalysis:
    """Evaluates integer index tensors as Affine forms and boolean masks as Formulas."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes

    # --------------------------------------------------------------- view axis maps
    def view_axes(self, source: Value, view: OpResult) -> dict[int, int | None] | None:
        """How `view` (a reshape, broadcast_to or transpose of `source`) moves source axes
        (counted from the right); None for a reshape that does more than add or drop unit dims."""
        op = view.op
        in_rank = source.type.rank if isinstance(source.type, TensorType) else 0
        out_rank = view.type.rank
        if op.name == "ft.broadcast_to":
            return {k: k for k in range(in_rank)}
        if op.name == "ft.transpose":
            perm = op.attributes["perm"]
            return {out_rank - 1 - perm[o]: out_rank - 1 - o for o in range(out_rank)}
        if op.name == "ft.reshape":
            return self._unit_reshape_axes(source, view)
        return None

    def _unit_reshape_axes(self, source: Value, view: Value) -> dict[int, int | None] | None:
        in_shape, out_shape = self.sizes.shape(source), self.sizes.shape(view)
        in_kept = [p for p, s in enumerate(in_shape) if not is_unit(s)]
        out_kept = [p for p, s in enumerate(out_shape) if not is_unit(s)]
        if len(in_kept) != len(out_kept) or any(in_shape[p] != out_shape[q] for p, q in zip(in_kept, out_kept)):
            return None
        in_rank, out_rank = len(in_shape), len(out_shape)
        axes: dict[int, int | None] = {in_rank - 1 - p: None for p in range(in_rank)}
        axes.update({in_rank - 1 - p: out_rank - 1 - q for p, q in zip(in_kept, out_kept)})
        return axes

    def _unit_axes_dropped(self, form: Affine, value: Value) -> Affine:
        if not isinstance(value.type, TensorType):
            return form
        shape = self.sizes.shape(value)
        rank = len(shape)
        axes = {k: (None if is_unit(shape[rank - 1 - k]) else k) for k in range(rank)}
        return form.remapped(axes) or form

    # ---------------------------------------------------------------------- integers
    def affine(self, value: Value) -> Affine | None:
        """`value` (an integer tensor or i64 scalar) as an Affine form, or None."""
        form = self._affine(value)
        return None if form is None else self._unit_axes_dropped(form, value)

    def _affine(self, value: Value) -> Affine | None:
        element = value.type.dtype if isinstance(value.type, TensorType) else value.type
        if not element.is_integer or element.name == "i1":
            return None
        if not isinstance(value.type, TensorType):
            return Affine.const(self.sizes.scalar(value))
        if not isinstance(value, OpResult):
            return None
        op = value.op
        literal = _integer_splat(value)
        if literal is not None:
            return Affine.const(Size.of(literal))
        if op.name == "ft.iota":
            start, step = op.attributes["start"], op.attributes["step"]
            if not (isinstance(start, int) and isinstance(step, int)):
                return None
            return Affine(_sorted_nonzero({0: step}), Size.of(start))
        if op.name in ("ft.reshape", "ft.broadcast_to", "ft.transpose"):
            inner = self.affine(op.operands[0])
            axes = self.view_axes(op.operands[0], value)
            return None if inner is None or axes is None else inner.remapped(axes)
        if op.name == "ft.cast":
            return self.affine(op.operands[0])
        return self._affine_arithmetic(op.name, op.operands, value)

    def _affine_arithmetic(self, name: str, operands: list[Value], result: Value) -> Affine | None:
        forms = [self.affine(o) for o in operands]
        if any(f is None or not self._broadcasts_exactly(o, _axes({f}), result) for f, o in zip(forms, operands)):
            return None
        if name == "ft.add":
            return forms[0] + forms[1]
        if name == "ft.sub":
            return forms[0] - forms[1]
        if name == "ft.neg":
            return forms[0].scaled(-1)
        if name == "ft.mul":
            for form, other in ((forms[0], forms[1]), (forms[1], forms[0])):
                factor = other.constant.constant
                if not other.coefficients and factor is not None:
                    return form.scaled(factor)
        return None

    # ---------------------------------------------------------------------- booleans
    def formula(self, value: Value) -> Formula | None:
        """The i1 tensor `value` as a disjunction of conjunctions of half-planes, or None."""
        if not isinstance(value.type, TensorType) or value.type.dtype.name != "i1" or not isinstance(value, OpResult):
            return None
        op = value.op
        literal = _boolean_splat(value)
        if literal is not None:
            return TRUE if literal else FALSE
        if op.name in ("ft.reshape", "ft.broadcast_to", "ft.transpose"):
            inner = self.formula(op.operands[0])
            axes = self.view_axes(op.operands[0], value)
            return None if inner is None or axes is None else map_formula(inner, axes)
        if op.name in _COMPARISONS:
            lhs, rhs = (self.affine(o) for o in op.operands)
            if lhs is None or rhs is None or not all(
                    self._broadcasts_exactly(o, _axes({f}), value) for f, o in ((lhs, op.operands[0]),
                                                                               (rhs, op.operands[1]))):
                return None
            return _compare(op.name, lhs, rhs)
        parts = [self.formula(o) for o in op.operands]
        if any(p is None or not self._broadcasts_exactly(o, _axes(*p), value) for p, o in zip(parts, op.operands)):
            return None
        return self._logical(op.name, parts)

    def broadcasts_into(self, value: Value, formula: Formula, target: Value) -> bool:
        """Whether the mask `value` (whose Formula is `formula`) meets `target`'s dims on
        every axis the formula reads, so broadcasting it into `target` repeats nothing the
        formula indexes."""
        return self._broadcasts_exactly(value, _axes(*formula), target)

    def _broadcasts_exactly(self, operand: Value, axes: set[int], result: Value) -> bool:
        """Whether `operand` has `result`'s size on each axis in `axes` (from the right):
        an axis broadcast from a dynamic size 1 would repeat one index, not count up."""
        if not axes:
            return True
        if not isinstance(operand.type, TensorType):
            return False
        rank, result_rank = operand.type.rank, result.type.rank
        return all(k < rank and self.sizes.dim(operand, rank - 1 - k) == self.sizes.dim(result, result_rank - 1 - k)
                   for k in axes)

    def _logical(self, name: str, parts: list[Formula | None]) -> Formula | None:
        if any(p is None for p in parts):
            return None
        if name in ("ft.logical_and", "ft.bitwise_and"):
            return conjoin(parts[0], parts[1])
        if name in ("ft.logical_or", "ft.bitwise_or"):
            return parts[0] | parts[1]
        if name in ("ft.logical_not", "ft.bitwise_not"):
            return negate(parts[0])
        if name == "ft.where":
            condition, if_true, if_false = parts
            negated = negate(condition)
            chosen, other = conjoin(condition, if_true), None if negated is None else conjoin(negated, if_false)
            return None if chosen is None or other is None else chosen | other
        return None


_COMPARISONS = frozenset({"ft.ge", "ft.gt", "ft.le", "ft.lt", "ft.eq", "ft.ne"})


def _axes(*conjunctions: frozenset[Affine] | set[Affine]) -> set[int]:
    """The axes any half-plane (Affine) in `conjunctions` has a coefficient on."""
    return {axis for conjunction in conjunctions for form in conjunction for axis, _ in form.coefficients}


def _compare(name: str, lhs: Affine, rhs: Affine) -> Formula | None:
    one = Affine.const(Size.of(1))
    ge, le = _half_plane(lhs - rhs), _half_plane(rhs - lhs)
    if name == "ft.ge":
        return ge
    if name == "ft.le":
        return le
    if name == "ft.gt":
        return _half_plane(lhs - rhs - one)
    if name == "ft.lt":
        return _half_plane(rhs - lhs - one)
    if name == "ft.eq":
        return conjoin(ge, le)
    return _half_plane(lhs - rhs - one) | _half_plane(rhs - lhs - one)


def _integer_splat(value: Value) -> int | None:
    number = fill_value(value)
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def _boolean_splat(value: Value) -> bool | None:
    number = fill_value(value)
    return number if isinstance(number, bool) else None


# ------------------------------------------------------------------------ classification


@dataclass(frozen=True)
class Visibility:
    """ft.attention's visibility attributes: `causal` and `window` (see ops/attention.py)."""

    causal: str = "none"
    window: int = 0


ALL_VISIBLE = Visibility()


@dataclass(frozen=True)
class _Bounds:
    """j - i <= upper and j - i >= lower (None: unbounded)."""

    upper: Size | None = None
    lower: Size | None = None


def classify(formula: Formula, rows: Size, keys: Size) -> Visibility | str:
    """The Visibility that lets key j < `keys` be seen by row i < `rows` exactly where
    `formula` holds, or a string saying why there is none."""
    if formula >= TRUE:
        return ALL_VISIBLE
    if not formula:
        return "the mask hides every key"
    if len(formula) > 1:
        return "the mask is a union of regions, not one causal band"
    bounds = _Bounds()
    for half_plane in next(iter(formula)):
        bounds = _tighten(bounds, half_plane, rows, keys)
        if isinstance(bounds, str):
            return bounds
    return _visibility(bounds, rows, keys)


def _tighten(bounds: _Bounds, h: Affine, rows: Size, keys: Size) -> _Bounds | str:
    a, b, c = h.coefficient(1), h.coefficient(0), h.constant
    if any(axis > 1 for axis, _ in h.coefficients):
        return "the mask depends on a batch or head index"
    if a == -b != 0:
        if a > 0:  # a·(i - j) + c >= 0  ⇔  j - i <= c / a
            upper = _floor_div(c, a)
            return "a diagonal offset that is not an integer" if upper is None else _with_upper(bounds, upper)
        lower = _floor_div(-c + Size.of(b - 1), b)  # b·(j - i) + c >= 0  ⇔  j - i >= ceil(-c / b)
        return "a diagonal offset that is not an integer" if lower is None else _with_lower(bounds, lower)
    if a == b == 0:
        return "a condition on sizes that is not known statically"
    if (a == 0 and _always_holds(b, c, keys)) or (b == 0 and _always_holds(a, c, rows)):
        return bounds
    if a and b:
        return f"the mask's boundary {_describe(h)} >= 0 is not a diagonal j - i = constant"
    return f"the mask bounds {'j' if b else 'i'} alone ({_describe(h)} >= 0), as a padding mask does"


def _floor_div(value: Size, divisor: int) -> Size | None:
    constant = value.constant
    if constant is not None:
        return Size.of(constant // divisor)
    return value if divisor == 1 else None


def _always_holds(coefficient: int, constant: Size, extent: Size) -> bool:
    """Whether coefficient·x + constant >= 0 for every x in [0, extent) (decided statically only)."""
    c, n = constant.constant, extent.constant
    if c is None:
        return False
    if coefficient >= 0:
        return c >= 0
    return n is not None and coefficient * (n - 1) + c >= 0


def _with_upper(bounds: _Bounds, upper: Size) -> _Bounds | str:
    if bounds.upper is None:
        return _Bounds(upper, bounds.lower)
    difference = (upper - bounds.upper).constant
    if difference is None:
        return "two causal diagonals whose order is not known statically"
    return _Bounds(upper if difference < 0 else bounds.upper, bounds.lower)


def _with_lower(bounds: _Bounds, lower: Size) -> _Bounds | str:
    if bounds.lower is None:
        return _Bounds(bounds.upper, lower)
    difference = (lower - bounds.lower).constant
    if difference is None:
        return "two window edges whose order is not known statically"
    return _Bounds(bounds.upper, lower if difference > 0 else bounds.lower)


def _visibility(bounds: _Bounds, rows: Size, keys: Size) -> Visibility | str:
    upper, lower = bounds.upper, bounds.lower
    if upper is not None and _covers_every_key(upper, keys):
        upper = None
    if lower is not None and _covers_every_key(Size.of(0) - lower, rows):
        lower = None
    if upper is None:
        return ALL_VISIBLE if lower is None else "a window without a causal diagonal (keys before the query only)"
    if upper == Size.of(0):
        causal = "upper_left"
    elif upper == keys - rows:
        causal = "lower_right"
    else:
        return f"the causal diagonal j <= i + {upper} is neither at offset 0 nor at Skv - Sq ({keys - rows})"
    if lower is None:
        return Visibility(causal, 0)
    window = (upper - lower).constant
    if window is None:
        return "the window's width is not a static integer"
    if window < 0:
        return "the mask hides every key"
    return Visibility(causal, window + 1)


def _covers_every_key(bound: Size, extent: Size) -> bool:
    """Whether `bound` >= extent - 1 statically, so the constraint removes nothing."""
    b, n = bound.constant, extent.constant
    return b is not None and n is not None and b >= n - 1


def _describe(h: Affine) -> str:
    names = {0: "j", 1: "i"}
    parts = [f"{c}*{names.get(axis, f'batch{axis}')}" for axis, c in h.coefficients]
    return " + ".join([*parts, str(h.constant)])


def is_mask_fill(value: float, dtype: ScalarType, scale_after: float) -> bool:
    """Whether filling with `value` (then multiplying by `scale_after` > 0) hides a key as
    surely as -inf: -inf itself, the dtype's lowest finite value (not scaled afterwards),
    or at most -1e9 (eager then gives masked keys a weight of exp(-1e9), which is 0)."""
    if value == -math.inf:
        return True
    if scale_after == 1.0 and dtype.is_float and value == torch.finfo(dtype.torch_dtype).min:
        return True
    return value * scale_after <= -1e9
