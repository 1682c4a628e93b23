"""cse: merge pure ops that compute the same thing.

Two ops are the same computation when they have the same name, the same operand values,
equal attributes and the same result types.  Only ops with the PURE trait merge (an
`ft.torch_call` may have side effects, so it never does), and ops with regions are left
alone.  Each block is its own scope: an op inside an `ft.fusion` region is not merged
with one outside it, so a fusion region keeps taking its inputs through its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from flagtree.ir.attributes import DenseAttr
from flagtree.ir.core import Block, Module, Operation
from flagtree.ir.opdef import PURE, TERMINATOR, has_trait
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import blocks


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge pure ops with the same name, operands, attributes and result types."""

    name: ClassVar[str] = "cse"

    def run(self, module: Module) -> bool:
        changed = False
        for block in list(blocks(module)):
            changed |= _eliminate_in_block(block)
        return changed


def _eliminate_in_block(block: Block) -> bool:
    first_of: dict[tuple, Operation] = {}
    changed = False
    for op in list(block.ops):
        if not _mergeable(op):
            continue
        key = _computation_key(op)
        earlier = first_of.setdefault(key, op)
        if earlier is not op:
            op.replace_with(earlier.results)
            changed = True
    return changed


def _mergeable(op: Operation) -> bool:
    return has_trait(op, PURE) and not has_trait(op, TERMINATOR) and not op.regions and bool(op.results)


def _computation_key(op: Operation) -> tuple:
    operands = tuple(id(v) for v in op.operands)
    attributes = tuple(sorted((name, _attribute_key(value)) for name, value in op.attributes.items()))
    return op.name, operands, attributes, tuple(op.result_types)


def _attribute_key(value: Any) -> Any:
    """A hashable key equal for two attribute values exactly when they are the same bits.

    Python's `==` is too loose here: `1 == 1.0 == True`, `0.0 == -0.0`, and DenseAttr's
    equality also treats -0.0 and +0.0 as equal.
    """
    if isinstance(value, float):
        return "float", value.hex()
    if isinstance(value, DenseAttr):
        return "dense", value.type, _bytes(value.value)
    if isinstance(value, list):
        return "list", tuple(_attribute_key(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _attribute_key(v)) for k, v in value.items()))
    return type(value).__name__, value


def _bytes(tensor: torch.Tensor) -> bytes:
    # A fresh buffer: a literal may be a broadcast view (stride 0), which `view` cannot reinterpret.
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype)
    flat.copy_(tensor.detach().reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()
