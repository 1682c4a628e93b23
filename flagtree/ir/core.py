"""FTIR's object model: operations with operands, results, attributes and regions.

The structure is MLIR's: a module is a `builtin.module` op whose single block holds
`func.func` ops; a function's region has one block whose arguments are the function's
parameters and whose last op is `func.return`.  Values keep use lists so rewrites can
replace all uses in O(uses).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from flagtree.ir.attributes import Attribute
from flagtree.ir.types import Type


@dataclass(frozen=True)
class Location:
    """Where an op came from: a file position, or a name (an FX node, a pass)."""

    file: str = ""
    line: int = 0
    col: int = 0
    name: str = ""

    def __str__(self) -> str:
        if self.file:
            pos = f"{self.file}:{self.line}:{self.col}"
            return f"{pos} ({self.name})" if self.name else pos
        return self.name or "<unknown>"


UNKNOWN_LOC = Location()


class Value:
    """An SSA value: a block argument or an op result."""

    def __init__(self, type_: Type):
        self.type = type_
        self.uses: list[tuple[Operation, int]] = []

    @property
    def users(self) -> list[Operation]:
        seen: dict[int, Operation] = {}
        for op, _ in self.uses:
            seen.setdefault(id(op), op)
        return list(seen.values())

    def replace_all_uses_with(self, new: Value) -> None:
        for op, index in list(self.uses):
            op.set_operand(index, new)

    @property
    def owner(self) -> Operation | Block:
        raise NotImplementedError


class BlockArgument(Value):
    def __init__(self, type_: Type, block: Block, index: int):
        super().__init__(type_)
        self.block = block
        self.index = index

    @property
    def owner(self) -> Block:
        return self.block

    def __repr__(self) -> str:
        return f"<arg{self.index}: {self.type}>"


class OpResult(Value):
    def __init__(self, type_: Type, op: Operation, index: int):
        super().__init__(type_)
        self.op = op
        self.index = index

    @property
    def owner(self) -> Operation:
        return self.op

    def __repr__(self) -> str:
        return f"<{self.op.name}#{self.index}: {self.type}>"


class Operation:
    """One op: `name`, operands, typed results, attributes, regions, location."""

    def __init__(
        self,
        name: str,
        operands: list[Value] | tuple[Value, ...] = (),
        result_types: list[Type] | tuple[Type, ...] = (),
        attributes: dict[str, Attribute] | None = None,
        regions: list[Region] | None = None,
        location: Location = UNKNOWN_LOC,
    ):
        self.name = name
        self.operands: list[Value] = []
        for operand in operands:
            self._append_operand(operand)
        self.results = [OpResult(t, self, i) for i, t in enumerate(result_types)]
        self.attributes: dict[str, Attribute] = dict(attributes or {})
        self.regions: list[Region] = []
        for region in regions or []:
            self.add_region(region)
        self.location = location
        self.parent: Block | None = None

    # operands -----------------------------------------------------------
    def _append_operand(self, value: Value) -> None:
        if not isinstance(value, Value):
            raise TypeError(f"operand of '{self.name}' must be a Value, got {type(value).__name__}")
        value.uses.append((self, len(self.operands)))
        self.operands.append(value)

    def set_operand(self, index: int, value: Value) -> None:
        old = self.operands[index]
        old.uses.remove((self, index))
        value.uses.append((self, index))
        self.operands[index] = value

    def drop_operands(self) -> None:
        for index, value in enumerate(self.operands):
            value.uses.remove((self, index))
        self.operands = []

    # structure ----------------------------------------------------------
    def add_region(self, region: Region) -> Region:
        region.parent = self
        self.regions.append(region)
        return region

    @property
    def result(self) -> OpResult:
        """The single result; raises if the op has zero or several."""
        if len(self.results) != 1:
            raise ValueError(f"'{self.name}' has {len(self.results)} results, not one")
        return self.results[0]

    @property
    def result_types(self) -> list[Type]:
        return [r.type for r in self.results]

    @property
    def short_name(self) -> str:
        """The name without its dialect: `ft.fused_moe` → `fused_moe`."""
        return self.name.split(".", 1)[-1]

    def walk(self) -> Iterator[Operation]:
        """This op and every op nested in its regions, in pre-order."""
        yield self
        for region in self.regions:
            for block in region.blocks:
                for op in list(block.ops):
                    yield from op.walk()

    def erase(self) -> None:
        """Remove from its block; its results must have no uses left."""
        for result in self.results:
            if result.uses:
                raise ValueError(f"cannot erase '{self.name}': result #{result.index} still has uses")
        for op in list(self.walk())[::-1]:
            op.drop_operands()
        if self.parent is not None:
            self.parent.ops.remove(self)
            self.parent = None

    def replace_with(self, values: list[Value]) -> None:
        """Replace every use of this op's results by `values` and erase the op."""
        if len(values) != len(self.results):
            raise ValueError(f"'{self.name}' has {len(self.results)} results; got {len(values)} replacements")
        for result, value in zip(self.results, values):
            result.replace_all_uses_with(value)
        self.erase()

    def __repr__(self) -> str:
        return f"<Operation {self.name} at {self.location}>"


class Block:
    """A list of ops with typed arguments."""

    def __init__(self, arg_types: list[Type] | tuple[Type, ...] = ()):
        self.args = [BlockArgument(t, self, i) for i, t in enumerate(arg_types)]
        self.ops: list[Operation] = []
        self.parent: Region | None = None

    def add_argument(self, type_: Type) -> BlockArgument:
        arg = BlockArgument(type_, self, len(self.args))
        self.args.append(arg)
        return arg

    def append(self, op: Operation) -> Operation:
        op.parent = self
        self.ops.append(op)
        return op

    def insert(self, index: int, op: Operation) -> Operation:
        op.parent = self
        self.ops.insert(index, op)
        return op

    def insert_before(self, anchor: Operation, op: Operation) -> Operation:
        return self.insert(self.ops.index(anchor), op)

    @property
    def terminator(self) -> Operation | None:
        return self.ops[-1] if self.ops else None


class Region:
    def __init__(self, blocks: list[Block] | None = None):
        self.blocks: list[Block] = []
        self.parent: Operation | None = None
        for block in blocks or []:
            self.append(block)

    def append(self, block: Block) -> Block:
        block.parent = self
        self.blocks.append(block)
        return block

    @property
    def block(self) -> Block:
        return self.blocks[0]


@dataclass
class Module:
    """A `builtin.module` op plus the tensors its `dense_resource` attributes name."""

    op: Operation
    resources: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def empty() -> Module:
        return Module(Operation("builtin.module", regions=[Region([Block()])]))

    @property
    def body(self) -> Block:
        return self.op.regions[0].block

    @property
    def functions(self) -> list[Operation]:
        return [op for op in self.body.ops if op.name == "func.func"]

    def function(self, name: str = "main") -> Operation:
        for func in self.functions:
            if func.attributes.get("sym_name") == name:
                return func
        raise KeyError(f"module has no function '@{name}'")

    def walk(self) -> Iterator[Operation]:
        return self.op.walk()

    def __str__(self) -> str:
        from flagtree.ir.printer import print_module

        return print_module(self)
