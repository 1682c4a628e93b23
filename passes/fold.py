"""fold: evaluate ops whose operands are all literals, at compile time.

An op folds when it is PURE, not a terminator, has no regions, has a reference
implementation and at least one operand, and every operand is an `ft.constant` holding a
dense or scalar literal (resources — weights — are never read).  It is evaluated with its
reference implementation, the same code the reference backend runs, so folding is exact,
and replaced by `ft.constant`s: a dense literal per tensor result of at most
`max-elements` elements, a scalar literal per scalar result.  An op whose evaluation
raises (say, an integer division by zero) is left for run time to report.

`ft.dim` of a static dimension folds to its size, an i64 literal, whatever its operand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from flagtree.errors import OptionsError
from flagtree.ir.attributes import DenseAttr
from flagtree.ir.builder import Builder
from flagtree.ir.core import Module, Operation, Value
from flagtree.ir.opdef import PURE, TERMINATOR, has_trait, lookup
from flagtree.ir.types import I64, ScalarType, TensorType, Type
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import blocks, dense_representable, literal, replace_op


@register_pass
@dataclass(frozen=True)
class Fold(Pass):
    """Evaluate ops on literal operands at compile time (results up to max-elements elements)."""

    name: ClassVar[str] = "fold"
    max_elements: int = 1024

    def __post_init__(self) -> None:
        if self.max_elements < 0:
            raise OptionsError(f"pass 'fold': max-elements must not be negative, not {self.max_elements}")

    def run(self, module: Module) -> bool:
        changed = False
        for block in list(blocks(module)):
            for op in list(block.ops):
                if op.parent is block:
                    changed |= self._fold(op)
        return changed

    def _fold(self, op: Operation) -> bool:
        if op.name == "ft.dim":
            return _fold_static_dim(op)
        if not self._foldable(op):
            return False
        results = _evaluate(op)
        if results is None:
            return False
        builder = Builder.before_op(op)
        replace_op(op, [_literal_constant(builder, r.type, value, op) for r, value in zip(op.results, results)])
        return True

    def _foldable(self, op: Operation) -> bool:
        opdef = lookup(op.name)
        return (
            opdef is not None and opdef.reference is not None and PURE in opdef.traits
            and not has_trait(op, TERMINATOR) and op.name != "ft.constant" and not op.regions
            and bool(op.operands) and all(literal(v) is not None for v in op.operands)
            and all(self._fits(r.type) for r in op.results)
        )

    def _fits(self, type_: Type) -> bool:
        if isinstance(type_, ScalarType):
            return True
        return type_.is_static and dense_representable(type_.dtype) and type_.numel() <= self.max_elements


def _fold_static_dim(op: Operation) -> bool:
    shape = op.operands[0].type.shape
    size = shape[op.attributes["dim"]]
    if size is None:
        return False
    replace_op(op, [Builder.before_op(op).value("ft.constant", result_type=I64, value=size)])
    return True


def _evaluate(op: Operation) -> list[Any] | None:
    """The op's results computed by its reference, or None if the evaluation raises."""
    reference = lookup(op.name).reference
    try:
        out = reference([literal(v) for v in op.operands], op.attributes, op.result_types)
    except (ArithmeticError, RuntimeError):
        return None
    return list(out) if isinstance(out, tuple) else [out]


def _literal_constant(builder: Builder, type_: Type, value: Any, op: Operation) -> Value:
    if isinstance(type_, TensorType):
        if not isinstance(value, torch.Tensor) or DenseAttr(value).type != type_:
            raise TypeError(f"{op.location}: '{op.name}' op: its reference returned {_describe(value)} for a "
                            f"result of type {type_}; fix the op's reference implementation")
        attr: Any = DenseAttr(value.detach().clone().contiguous())
    else:
        attr = _scalar(value, type_)
    return builder.value("ft.constant", result_type=type_, value=attr)


def _scalar(value: Any, type_: ScalarType) -> int | float | bool:
    number = value.item() if isinstance(value, torch.Tensor) else value
    if type_.name == "i1":
        return bool(number)
    return float(number) if type_.is_float else int(number)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {list(value.shape)} {value.dtype} tensor"
    return f"a {type(value).__name__}"
