"""Op definitions: the single source of truth for what each FTIR op means.

An `OpDef` says how many operands and results an op has, which attributes it takes,
how its result types follow from its operands (`infer`), and what it computes
(`reference`, written with eager torch).  The verifier, the reference backend, constant
folding and docs/ops.md all read these definitions, so an op is described once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flagtree.ir.core import Operation
from flagtree.ir.types import Type

# A reference implementation: (runtime operand values, attributes, result types) → value(s).
Reference = Callable[[list[Any], dict[str, Any], list[Type]], Any]
# Result-type inference: the op (operands typed, attributes set) → result types,
# or a string saying why the operands are invalid.
Infer = Callable[[Operation], "list[Type] | str"]

# Traits passes rely on.
PURE = "pure"  # no side effects: CSE and DCE may merge or drop it
ELEMENTWISE = "elementwise"  # result[i] depends on operands[i] only (with broadcasting)
COMMUTATIVE = "commutative"  # binary op whose operands may be swapped
TERMINATOR = "terminator"  # must be last in its block
REDUCTION = "reduction"
SHAPE = "shape"  # moves or views data without arithmetic
FUSED = "fused"  # a fused op produced by a fusion pass; reports count it


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: its Python kind(s), whether required, and what it means."""

    kinds: tuple[type, ...]
    doc: str
    required: bool = True


@dataclass(frozen=True)
class OpDef:
    name: str
    summary: str
    operands: tuple[int, int | None]  # (min, max); max None = variadic
    results: tuple[int, int | None] = (1, 1)
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    traits: frozenset[str] = frozenset({PURE})
    infer: Infer | None = None
    reference: Reference | None = None
    operand_doc: str = ""

    @property
    def short_name(self) -> str:
        return self.name.split(".", 1)[-1]


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in _REGISTRY:
        raise ValueError(f"op '{opdef.name}' is defined twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def lookup(name: str) -> OpDef | None:
    """The definition of `name`, or None for an unknown op."""
    _load_definitions()
    return _REGISTRY.get(name)


def all_ops() -> list[OpDef]:
    _load_definitions()
    return sorted(_REGISTRY.values(), key=lambda d: d.name)


def has_trait(op: Operation, trait: str) -> bool:
    opdef = lookup(op.name)
    return opdef is not None and trait in opdef.traits


def _load_definitions() -> None:
    # The op modules register themselves on import.
    import flagtree.ir.ops  # noqa: F401
