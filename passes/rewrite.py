"""Building blocks for passes written as rewrite patterns over FTIR.

A pattern is a function `(op) -> bool`: it matches a root op, checks its constraints,
builds the replacement with `Builder.before_op(op)`, calls `replace_op`, and returns True;
or it returns False and leaves the IR untouched.  `apply_patterns` runs a `PatternSet`
over a module until nothing matches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch

from flagtree.ir.attributes import DenseAttr
from flagtree.ir.builder import Builder
from flagtree.ir.core import Block, Module, Operation, OpResult, Value
from flagtree.ir.opdef import PURE, TERMINATOR, has_trait
from flagtree.ir.types import ScalarType, TensorType, Type, from_torch_dtype

Rewrite = Callable[[Operation], bool]
Number = int | float | bool


def blocks(module: Module) -> Iterator[Block]:
    """Every block of `module`, nested regions included, outer blocks first."""
    pending = [module.body]
    while pending:
        block = pending.pop()
        yield block
        pending.extend(inner for op in block.ops for region in op.regions for inner in region.blocks)


def element_type(t: Type) -> ScalarType:
    """The element type of a tensor type, or the scalar type itself."""
    return t.dtype if isinstance(t, TensorType) else t


def dense_representable(dtype: ScalarType) -> bool:
    """Whether a DenseAttr can hold values of `dtype` (fp4 has no unpacked torch dtype)."""
    return from_torch_dtype(dtype.torch_dtype) == dtype


def is_constant(value: Value) -> bool:
    """Whether `value` is the result of an ft.constant (a literal or a resource)."""
    return isinstance(value, OpResult) and value.op.name == "ft.constant"


def literal(value: Value) -> torch.Tensor | Number | None:
    """The value an ft.constant with a dense or scalar literal defines; None for anything else."""
    if not is_constant(value):
        return None
    attr = value.op.attributes["value"]
    if isinstance(attr, DenseAttr):
        return attr.value
    return attr if isinstance(attr, (int, float, bool)) else None


def splat(value: Value) -> Number | None:
    """The element of a literal whose elements are all bitwise equal (the sign of zero counts);
    None when `value` is no literal, is empty, mixes values, or is NaN."""
    data = literal(value)
    if not isinstance(data, torch.Tensor):
        return data
    flat = data.reshape(-1)
    if flat.numel() == 0:
        return None
    first = flat[0]
    if not torch.equal(flat, first.expand_as(flat)):
        return None
    if flat.is_floating_point() and not torch.equal(flat.signbit(), first.signbit().expand_as(flat)):
        return None
    return first.item()


def fill_value(value: Value) -> Number | None:
    """The one number every element of `value` holds when an ft.full or a splat literal defines it."""
    if isinstance(value, OpResult) and value.op.name == "ft.full":
        return value.op.attributes["value"]
    return splat(value)


def is_splat_of(value: Value, number: Number) -> bool:
    """Whether every element of the literal `value` is exactly `number` (-0.0 is not 0.0)."""
    element = splat(value)
    if element is None or (isinstance(element, float) and math.isnan(element)):
        return False
    if element != number:
        return False
    return not (isinstance(number, float) and math.copysign(1.0, element) != math.copysign(1.0, number))


def may_contain_zero(value: Value) -> bool:
    """False only when `value` is a literal with no zero element."""
    data = literal(value)
    if data is None:
        return True
    if isinstance(data, torch.Tensor):
        return bool((data == 0).any())
    return data == 0


def constant(builder: Builder, type_: Type, number: Number) -> Value:
    """An ft.constant of `type_` with every element `number`."""
    if isinstance(type_, TensorType):
        attr = DenseAttr(torch.full(type_.shape, number, dtype=type_.dtype.torch_dtype))
        return builder.value("ft.constant", result_type=type_, value=attr)
    return builder.value("ft.constant", result_type=type_, value=number)


def is_trivially_dead(op: Operation) -> bool:
    """A pure, non-terminator op none of whose results is used."""
    return (has_trait(op, PURE) and not has_trait(op, TERMINATOR)
            and not any(result.uses for result in op.results))


def replace_op(op: Operation, values: list[Value]) -> None:
    """Replace `op`'s results by `values`, erase it, and erase the producers this leaves dead."""
    operands = list(op.operands)
    op.replace_with(values)
    erase_dead_producers(operands)


def erase_dead_producers(values: Iterable[Value]) -> None:
    """Erase the ops defining `values` if they are trivially dead, and so on up the chain."""
    worklist = [v.op for v in values if isinstance(v, OpResult)]
    while worklist:
        producer = worklist.pop()
        if producer.parent is None or not is_trivially_dead(producer):
            continue
        inputs = list(producer.operands)
        producer.erase()
        worklist.extend(v.op for v in inputs if isinstance(v, OpResult))


class PatternSet:
    """Patterns indexed by the name of the root op they match."""

    def __init__(self) -> None:
        self._by_root: dict[str, list[Rewrite]] = defaultdict(list)
        self._any_root: list[Rewrite] = []

    def pattern(self, *roots: str) -> Callable[[Rewrite], Rewrite]:
        """Decorator: register a pattern for ops named `roots` (none given: every op)."""

        def register(rewrite: Rewrite) -> Rewrite:
            if not roots:
                self._any_root.append(rewrite)
            for root in roots:
                self._by_root[root].append(rewrite)
            return rewrite

        return register

    def for_op(self, op: Operation) -> list[Rewrite]:
        return self._any_root + self._by_root.get(op.name, [])


def apply_patterns(module: Module, patterns: PatternSet, max_iterations: int) -> bool:
    """Sweep `module` applying `patterns` until a sweep changes nothing (at most
    `max_iterations` sweeps); return True if anything changed."""
    changed = False
    for _ in range(max_iterations):
        if not _sweep_block(module.body, patterns):
            break
        changed = True
    return changed


def _sweep_block(block: Block, patterns: PatternSet) -> bool:
    changed = False
    for op in list(block.ops):
        if op.parent is not block:
            continue  # erased by an earlier rewrite in this sweep
        if any(rewrite(op) for rewrite in patterns.for_op(op)):
            changed = True
        if op.parent is block:
            for region in op.regions:
                for inner in region.blocks:
                    changed |= _sweep_block(inner, patterns)
    return changed
