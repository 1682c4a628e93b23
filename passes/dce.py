"""dce: erase pure ops whose results nobody uses, until none is left.

Terminators and ops without the PURE trait (`ft.torch_call`) always stay.  A block is
scanned from its end, so a chain of dead ops goes in one scan; the pass repeats until a
scan erases nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flagtree.ir.core import Block, Module
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import blocks, is_trivially_dead


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Erase pure ops whose results are unused."""

    name: ClassVar[str] = "dce"

    def run(self, module: Module) -> bool:
        changed = False
        while True:
            erased = [_erase_dead_ops(block) for block in list(blocks(module))]
            if not any(erased):
                return changed
            changed = True


def _erase_dead_ops(block: Block) -> bool:
    erased = False
    for op in reversed(list(block.ops)):
        if is_trivially_dead(op):
            op.erase()
            erased = True
    return erased
