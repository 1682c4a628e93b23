"""Symbolic sizes: turn torch's sympy size expressions into FTIR i64 arithmetic.

With `dynamic=True`, a dim such as `s0 * 8` has no static value. Every symbol comes from a
graph input (a dim of a tensor argument, or a SymInt argument), so any size expression can
be rebuilt at run time from `ft.dim` reads and i64 ops. The function records where each
symbol comes from in its `ft.symbols` attribute so shapes stay explainable.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
from torch.utils._sympy import functions as symfn

from flagtree.ir.core import Value
from flagtree.ir.types import I64, Type

# Emits one op and returns its result: (op name, operands, attributes, result type or None
# to infer it) → value.
Emit = Callable[[str, list[Value], dict, Type | None], Value]


class UnsupportedSize(Exception):
    """A size expression flagtree cannot rebuild (an unknown symbol or function)."""


class SymbolicSizes:
    """Where each symbol comes from, and a cache of materialized expressions."""

    def __init__(self, emit: Emit):
        self._emit = emit
        self._sources: dict[sympy.Symbol, tuple[Value, int | None]] = {}
        self._cache: dict[sympy.Expr, Value] = {}

    def bind_dim(self, symbol: sympy.Symbol, tensor: Value, dim: int) -> bool:
        """Record `symbol` as dim `dim` of `tensor` unless it is already known; True if recorded."""
        if symbol in self._sources:
            return False
        self._sources[symbol] = (tensor, dim)
        return True

    def bind_value(self, symbol: sympy.Symbol, value: Value) -> bool:
        """Record `symbol` as the i64 `value` (a SymInt argument) unless already known."""
        if symbol in self._sources:
            return False
        self._sources[symbol] = (value, None)
        return True

    def remember(self, expr: sympy.Expr, value: Value) -> None:
        """`value` computes `expr`; later materializations of `expr` reuse it."""
        self._cache.setdefault(expr, value)

    def materialize(self, expr: sympy.Expr) -> Value:
        """An i64 value computing `expr`; raises UnsupportedSize if it cannot be built."""
        if expr not in self._cache:
            self._cache[expr] = self._build(expr)
        return self._cache[expr]

    def _build(self, expr: sympy.Expr) -> Value:
        if expr.is_Integer:
            return self._emit("ft.constant", [], {"value": int(expr)}, I64)
        if expr.is_Symbol:
            return self._symbol(expr)
        if isinstance(expr, (sympy.Add, sympy.Mul, symfn.Max, symfn.Min)):
            name = {sympy.Add: "ft.add", sympy.Mul: "ft.mul", symfn.Max: "ft.maximum", symfn.Min: "ft.minimum"}[
                type(expr)
            ]
            return self._fold(name, expr.args)
        if isinstance(expr, (symfn.FloorDiv, symfn.CleanDiv)):
            return self._binary("ft.floordiv", *expr.args)
        if isinstance(expr, (symfn.Mod, symfn.PythonMod, sympy.Mod)):
            return self._binary("ft.remainder", *expr.args)
        if isinstance(expr, symfn.CeilDiv):
            # ceil(a / b) == -((-a) // b)
            return self.materialize(-symfn.FloorDiv(-expr.args[0], expr.args[1]))
        if isinstance(expr, symfn.ModularIndexing):
            base, divisor, modulus = expr.args
            return self._binary_values("ft.remainder", self._binary("ft.floordiv", base, divisor),
                                       self.materialize(modulus))
        if isinstance(expr, (sympy.Pow, symfn.PowByNatural)) and expr.args[1].is_Integer and expr.args[1] >= 1:
            return self._fold("ft.mul", [expr.args[0]] * int(expr.args[1]))
        raise UnsupportedSize(f"size expression '{expr}' uses {type(expr).__name__}, which flagtree cannot build")

    def _symbol(self, symbol: sympy.Symbol) -> Value:
        if symbol not in self._sources:
            raise UnsupportedSize(f"size symbol '{symbol}' comes from no graph input (data-dependent size)")
        value, dim = self._sources[symbol]
        if dim is None:
            return value
        return self._emit("ft.dim", [value], {"dim": dim}, None)

    def _fold(self, name: str, args: tuple[sympy.Expr, ...] | list[sympy.Expr]) -> Value:
        values = [self.materialize(a) for a in args]
        result = values[0]
        for v in values[1:]:
            result = self._binary_values(name, result, v)
        return result

    def _binary(self, name: str, lhs: sympy.Expr, rhs: sympy.Expr) -> Value:
        return self._binary_values(name, self.materialize(lhs), self.materialize(rhs))

    def _binary_values(self, name: str, lhs: Value, rhs: Value) -> Value:
        return self._emit(name, [lhs, rhs], {}, None)
