"""Build FTIR: create ops at an insertion point, inferring result types when they
follow from the operands."""

from __future__ import annotations

from typing import Any

from flagtree.errors import VerificationError
from flagtree.ir.core import UNKNOWN_LOC, Block, Location, Module, Operation, Region, Value
from flagtree.ir.opdef import lookup
from flagtree.ir.types import Type


class Builder:
    """Creates ops in `block`, before `before` (or at the end), tagged with `location`."""

    def __init__(self, block: Block, before: Operation | None = None, location: Location = UNKNOWN_LOC):
        self.block = block
        self.before = before
        self.location = location

    @staticmethod
    def before_op(op: Operation) -> Builder:
        """A builder inserting right before `op`, using `op`'s location."""
        return Builder(op.parent, op, op.location)

    def create(
        self,
        name: str,
        operands: list[Value] | tuple[Value, ...] = (),
        attributes: dict[str, Any] | None = None,
        result_types: list[Type] | None = None,
        regions: list[Region] | None = None,
        location: Location | None = None,
    ) -> Operation:
        """Create and insert an op; `result_types=None` infers them from the definition."""
        attributes = dict(attributes or {})
        if isinstance(attributes.get("dims"), list):
            attributes["dims"] = tuple(attributes["dims"])
        if result_types is None:
            result_types = infer_result_types(name, operands, attributes, regions)
        op = Operation(name, operands, result_types, attributes, regions, location or self.location)
        if self.before is None:
            self.block.append(op)
        else:
            self.block.insert_before(self.before, op)
        return op

    def value(self, name: str, *operands: Value, result_type: Type | None = None, **attributes: Any) -> Value:
        """Create a single-result op and return its result."""
        types = None if result_type is None else [result_type]
        return self.create(name, operands, attributes, types).result


def infer_result_types(
    name: str, operands: list[Value] | tuple[Value, ...], attributes: dict[str, Any], regions: list[Region] | None
) -> list[Type]:
    """The result types the op definition implies; raises VerificationError if it cannot."""
    opdef = lookup(name)
    if opdef is None or opdef.infer is None:
        raise VerificationError(f"'{name}': result types must be given (no inference for this op)")
    probe = Operation(name, operands, (), attributes, None)
    probe.regions = regions or []
    try:
        inferred = opdef.infer(probe)
    finally:
        probe.drop_operands()
    if isinstance(inferred, str):
        raise VerificationError(f"'{name}' op: {inferred}")
    return inferred


def new_function(module: Module, name: str, arg_types: list[Type]) -> tuple[Operation, Block]:
    """Append an empty `func.func @name(arg_types)` to `module`; returns it and its body."""
    block = Block(arg_types)
    func = Operation("func.func", attributes={"sym_name": name}, regions=[Region([block])])
    module.body.append(func)
    return func, block
