"""legalize-dtypes: compute in f32 where the target lacks an op's floating-point element type.

`native` lists the element types the target computes in (a backend derives it from its
Capabilities: `legalize-dtypes{native=[f32,f16,i1,i8,i16,i32,i64,ui8]}`).  Each op that
computes on tensors of a narrower floating-point type the list lacks (bf16 on a chip
without bf16, f8/f4 types) gets `ft.cast`s to f32 on those operands, computes in f32, and
is followed by casts of those results back to their old type, so every value keeps its
type and every function its signature.  Rounding to the old type after each op keeps the
values each op produces; only its internal precision can grow.

Computing ops are all ops except data movement and literals: casts, shape ops (views,
concat, gather, ... but not a scatter or index_put that accumulates), ft.constant,
ft.full, ft.iota, `ft.torch_call` (eager torch with its own semantics), `ft.fusion` (its
region's ops are legalised one by one), terminators, and ops on scalars (host-side size
arithmetic).  A computation in a non-native type that f32 cannot hold exactly (f64, an
integer type) is an error naming the op: narrowing it would change results silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flagtree.errors import OptionsError, PassError
from flagtree.ir.builder import Builder
from flagtree.ir.core import Module, Operation
from flagtree.ir.opdef import SHAPE, TERMINATOR, has_trait, lookup
from flagtree.ir.types import ELEMENT_TYPE_NAMES, F32, TensorType, Type, types_compatible
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import blocks

_DATA_MOVEMENT = frozenset({"ft.cast", "ft.constant", "ft.full", "ft.iota", "ft.torch_call", "ft.fusion"})


@register_pass
@dataclass(frozen=True)
class LegalizeDtypes(Pass):
    """Compute in f32 where an op's floating-point element type is not in `native`."""

    name: ClassVar[str] = "legalize-dtypes"
    native: tuple[str, ...] = ELEMENT_TYPE_NAMES

    def __post_init__(self) -> None:
        unknown = [name for name in self.native if name not in ELEMENT_TYPE_NAMES]
        if unknown:
            raise OptionsError(f"pass 'legalize-dtypes': native lists unknown element type(s) "
                               f"{', '.join(unknown)}; valid: {', '.join(ELEMENT_TYPE_NAMES)}")
        if F32.name not in self.native:
            raise OptionsError("pass 'legalize-dtypes': native must include f32, the type it legalises "
                               f"computations to (got [{','.join(self.native)}])")

    def run(self, module: Module) -> bool:
        changed = False
        for block in list(blocks(module)):
            for op in list(block.ops):
                if computes_on_tensors(op):
                    changed |= self._legalize(op)
        return changed

    def _legalize(self, op: Operation) -> bool:
        operands = [i for i, v in enumerate(op.operands) if self._needs_f32(op, v.type)]
        results = [r for r in op.results if self._needs_f32(op, r.type)]
        if not operands and not results:
            return False
        before = Builder.before_op(op)
        for index in operands:
            value = op.operands[index]
            op.set_operand(index, before.value("ft.cast", value, result_type=_in_f32(value.type)))
        after = Builder(op.parent, op.parent.ops[op.parent.ops.index(op) + 1], op.location)
        for result in results:
            narrow_type = result.type
            result.type = _in_f32(narrow_type)
            users = list(result.uses)
            narrowed = after.value("ft.cast", result, result_type=narrow_type)
            for user, index in users:
                user.set_operand(index, narrowed)
        self._check_computes_in_f32(op)
        return True

    def _check_computes_in_f32(self, op: Operation) -> None:
        """Raise if `op`'s definition rejects the f32 types it now has."""
        infer = lookup(op.name).infer
        inferred = infer(op) if infer else [r.type for r in op.results]
        if isinstance(inferred, str):
            problem = inferred
        elif not all(types_compatible(r.type, t) for r, t in zip(op.results, inferred)):
            problem = f"its operands would give {', '.join(map(str, inferred))}"
        else:
            return
        raise PassError(f"{op.location}: '{op.name}' op cannot compute in f32 ({problem}) and the target lacks "
                        f"its element type (native: {', '.join(self.native)})")

    def _needs_f32(self, op: Operation, type_: Type) -> bool:
        """Whether a value of `type_` read or produced by `op` must be computed in f32."""
        if not isinstance(type_, TensorType) or type_.dtype.name in self.native:
            return False
        dtype = type_.dtype
        if not dtype.is_float or dtype.bitwidth >= 32:
            raise PassError(f"{op.location}: '{op.name}' op computes in {dtype}, which the target lacks "
                            f"(native: {', '.join(self.native)}); only floating-point types narrower than f32 "
                            f"are computed in f32 instead, as f32 holds all their values; add {dtype} to the "
                            f"target's capabilities or cast before this op")
        return True


def computes_on_tensors(op: Operation) -> bool:
    """Whether `op` does arithmetic on tensor elements (see the module docstring)."""
    if op.name in _DATA_MOVEMENT or lookup(op.name) is None or has_trait(op, TERMINATOR):
        return False
    if not any(isinstance(v.type, TensorType) for v in [*op.operands, *op.results]):
        return False
    if has_trait(op, SHAPE):
        return _accumulates(op)
    return True


def _accumulates(op: Operation) -> bool:
    """Shape ops that add the elements they write (scatter-add, index_put with accumulate)."""
    return op.attributes.get("reduce") == "add" or op.attributes.get("accumulate") is True


def _in_f32(type_: TensorType) -> TensorType:
    return type_.with_dtype(F32)
