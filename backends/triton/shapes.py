"""Symbolic shapes of the values inside a fusion region.

A dimension is an `int` (static) or a *size template*: a Python expression over the
fusion op's operands, written with `{k}` for operand k, that computes the size at run
time in the launch plan (`{0}.shape[1]`, `{2}` for an i64 operand, or
`len(range({0}.shape[1])[2:10:1])` for a slice).  Kernels receive each distinct
template as one integer argument, so a new sequence length needs no recompile.
"""

from __future__ import annotations

from flagtree.backends.lowering import UnsupportedRegion
from flagtree.ir.core import Operation, Value
from flagtree.ir.opdef import ELEMENTWISE, has_trait
from flagtree.ir.types import TensorType

Dim = int | str
Shape = tuple[Dim, ...]

REDUCTIONS = frozenset({"ft.sum", "ft.mean", "ft.amax", "ft.amin", "ft.any", "ft.all"})
ROW_NORMALIZERS = frozenset({"ft.softmax", "ft.log_softmax"})
VIEWS = frozenset({"ft.reshape", "ft.transpose", "ft.broadcast_to", "ft.slice"})


def broadcast(shapes: list[Shape], assumed: set[tuple[Dim, Dim]]) -> Shape:
    """NumPy broadcasting of symbolic shapes.  Where sizes meet at one dim, the first
    static size other than 1 (else the first run-time size) is taken, and every other
    size is recorded in `assumed` as equal to it: eager torch would reject the inputs
    otherwise, and the launch plan checks these equalities before each launch."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        live = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0 and s[len(s) - rank + i] != 1]
        static = [d for d in live if isinstance(d, int)]
        if len(set(static)) > 1:
            raise UnsupportedRegion(f"shapes {' and '.join(str(list(s)) for s in shapes)} do not broadcast")
        chosen = static[0] if static else live[0] if live else 1
        assumed.update(assumption(chosen, d) for d in live if d != chosen)
        out.append(chosen)
    return tuple(out)


def assumption(a: Dim, b: Dim) -> tuple[Dim, Dim]:
    """The pair `a == b` in one canonical order (so kernels are generated deterministically)."""
    return (a, b) if repr(a) <= repr(b) else (b, a)


def reduced_dims(op: Operation) -> tuple[int, ...]:
    """The dims a reduction (or softmax) op reduces, normalised and sorted."""
    rank = op.operands[0].type.rank
    if op.name in ROW_NORMALIZERS:
        return (op.attributes["dim"] % rank,)
    dims = op.attributes.get("dims", ()) or tuple(range(rank))
    return tuple(sorted(d % rank for d in dims))


class RegionShapes:
    """The symbolic shape of every value in one `ft.fusion` region."""

    def __init__(self, fusion: Operation):
        self.assumed: set[tuple[Dim, Dim]] = set()  # sizes taken to be equal (see `broadcast`)
        self._shapes: dict[int, Shape] = {}
        self._scalars: dict[int, str] = {}
        block = fusion.regions[0].block
        for index, arg in enumerate(block.args):
            if isinstance(arg.type, TensorType):
                self._shapes[id(arg)] = tuple(
                    f"{{{index}}}.shape[{d}]" if size is None else size for d, size in enumerate(arg.type.shape))
            else:
                self._shapes[id(arg)] = ()
                self._scalars[id(arg)] = f"{{{index}}}"
        for op in block.ops[:-1]:
            for result in op.results:
                self._shapes[id(result)] = self._result_shape(op, result)

    def of(self, value: Value) -> Shape:
        return self._shapes[id(value)]

    def _size_operand(self, op: Operation, value: Value) -> str:
        if id(value) not in self._scalars:
            raise UnsupportedRegion(f"'{op.name}' takes a size computed inside the region; compute it outside")
        return self._scalars[id(value)]

    def _result_shape(self, op: Operation, result: Value) -> Shape:
        declared = result.type.shape if isinstance(result.type, TensorType) else ()
        computed = self._computed_shape(op, declared)
        return tuple(computed[i] if size is None else size for i, size in enumerate(declared))

    def _computed_shape(self, op: Operation, declared: tuple[int | None, ...]) -> Shape:
        operands = [self.of(v) for v in op.operands]
        if op.name in ("ft.reshape", "ft.broadcast_to"):
            sizes = iter(self._size_operand(op, v) for v in op.operands[1:])
            return tuple(next(sizes) if d is None else d for d in declared)
        if op.name == "ft.transpose":
            return tuple(operands[0][p] for p in op.attributes["perm"])
        if op.name == "ft.slice":
            shape = list(operands[0])
            dim = op.attributes["dim"] % len(shape)
            start, end, step = (op.attributes[k] for k in ("start", "end", "step"))
            shape[dim] = f"len(range({shape[dim]})[{start}:{end}:{step}])"
            return tuple(shape)
        if op.name in REDUCTIONS:
            dims = reduced_dims(op)
            keep = op.attributes.get("keepdim", False)
            return tuple(1 if i in dims else d for i, d in enumerate(operands[0]) if keep or i not in dims)
        if op.name in ROW_NORMALIZERS:
            return operands[0]
        if op.name == "ft.constant":
            return declared
        if has_trait(op, ELEMENTWISE):
            return broadcast(operands, self.assumed)
        raise UnsupportedRegion(f"'{op.name}' cannot be part of a generated Triton kernel")
