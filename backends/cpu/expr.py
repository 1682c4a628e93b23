"""Values while a kernel is emitted: MLIR tensors, and lazy elementwise expressions over them.

Elementwise ops and views (transpose, broadcast, unit-dim reshapes) do not emit code when
they are lowered: they build a `Lazy` value, a scalar expression DAG over `Leaf` reads of
tensors through affine index maps.  Code is emitted only where a loop nest is needed (a
reduction, an output, a reshape that is not a view); that loop nest evaluates the whole
DAG in one linalg.generic body.  So an elementwise group becomes one loop with every
intermediate in registers, and a multi-use value costs no temporary buffer, whatever
MLIR's own elementwise-fusion heuristics would do.  An f16/bf16 op's result is a `Rounded`
node over its f32 computation, so the DAG holds the values eager torch would.  A
concatenation is `Joined`: its pieces stay lazy until the kernel writes each into its slice
of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flagtree.backends.cpu.mlir_text import is_narrow_float
from flagtree.ir.types import I64, ScalarType

# A map from a value's iteration dims to a tensor's dims: entry k (an int) reads the tensor
# at iteration index d_k; None reads index 0 (a broadcast size-1 dim).
Map = tuple[int | None, ...]
Size = int | str  # a static size, or the SSA name of an `index` value


@dataclass(frozen=True, eq=False)
class Tensor:
    """An MLIR value of tensor type, with the sizes of its dims."""

    ssa: str
    shape: tuple[int | None, ...]
    element: str  # the MLIR element type it holds
    sizes: tuple[Size, ...]
    contiguous: bool = True  # row-major and dense: false for strided slices

    @property
    def rank(self) -> int:
        return len(self.shape)


class Node:
    """A scalar expression evaluated at every point of a Lazy value's iteration space."""

    dtype: ScalarType


@dataclass(eq=False)
class Leaf(Node):
    """Read `tensor` at `map` of the iteration index (converted to dtype's compute type)."""

    tensor: Tensor
    map: Map
    dtype: ScalarType


@dataclass(eq=False)
class Scalar(Node):
    """An SSA scalar defined at function scope (a constant, a scalar argument, a size)."""

    ssa: str
    dtype: ScalarType


@dataclass(eq=False)
class Index(Node):
    """The iteration index along `dim` as i64 (None: the constant 0 of a broadcast dim)."""

    dim: int | None
    dtype: ScalarType = I64


@dataclass(eq=False)
class Apply(Node):
    """An FTIR elementwise op (by name) applied to operand expressions."""

    name: str
    operands: tuple[Node, ...]
    dtype: ScalarType
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Rounded(Node):
    """`operand`, computed in f32, rounded to the f16/bf16 `dtype` (and held in f32 again):
    what eager torch stores for an op whose result has that type."""

    operand: Node
    dtype: ScalarType


@dataclass(frozen=True, eq=False)
class Lazy:
    """A tensor value not yet computed: `node` at every index of `shape`."""

    node: Node
    shape: tuple[int | None, ...]
    sizes: tuple[Size, ...]
    dtype: ScalarType

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, eq=False)
class Joined:
    """A concatenation not yet computed: `pieces` joined along `dim` into `shape`.  Each
    piece is computed by a loop nest of its own into its slice of the result; one loop over
    the whole result, selecting a piece per point, would read every piece's inputs out of
    their bounds."""

    pieces: tuple[Lazy, ...]
    dim: int
    shape: tuple[int | None, ...]
    sizes: tuple[Size, ...]
    dtype: ScalarType


def identity(rank: int) -> Map:
    return tuple(range(rank))


def leaf(tensor: Tensor, dtype: ScalarType) -> Lazy:
    """A tensor as a Lazy value that reads it element by element."""
    return Lazy(Leaf(tensor, identity(tensor.rank), dtype), tensor.shape, tensor.sizes, dtype)


def rounded(value: Lazy) -> Lazy:
    """`value` rounded to its type when that is a narrow float (computed wider), else itself."""
    if not is_narrow_float(value.dtype):
        return value
    return Lazy(Rounded(value.node, value.dtype), value.shape, value.sizes, value.dtype)


def reindex(value: Lazy, dims: Map, shape: tuple[int | None, ...], sizes: tuple[Size, ...]) -> Lazy:
    """`value` seen from a new iteration space of `shape`: its dim k is new dim `dims[k]`
    (None: the new space does not vary it, e.g. a broadcast).  Shared sub-DAGs stay shared."""
    if dims == identity(len(shape)):
        return Lazy(value.node, shape, sizes, value.dtype)
    memo: dict[int, Node] = {}

    def visit(node: Node) -> Node:
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, Leaf):
            new: Node = Leaf(node.tensor, tuple(None if e is None else dims[e] for e in node.map), node.dtype)
        elif isinstance(node, Index):
            new = Index(None if node.dim is None else dims[node.dim])
        elif isinstance(node, Apply):
            new = Apply(node.name, tuple(visit(o) for o in node.operands), node.dtype, node.attrs)
        elif isinstance(node, Rounded):
            new = Rounded(visit(node.operand), node.dtype)
        else:
            new = node
        memo[id(node)] = new
        return new

    return Lazy(visit(value.node), shape, sizes, value.dtype)


def leaves(roots: list[Node]) -> list[Leaf]:
    """The distinct (tensor, map) reads of a DAG, in first-visit order."""
    seen: set[int] = set()
    found: dict[tuple[str, Map], Leaf] = {}
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Leaf):
            found.setdefault((node.tensor.ssa, node.map), node)
        elif isinstance(node, Apply):
            stack.extend(reversed(node.operands))
        elif isinstance(node, Rounded):
            stack.append(node.operand)
    return list(found.values())


def as_tensor_read(value: Lazy) -> Tensor | None:
    """The tensor `value` reads unchanged, if it is just that (then no copy is needed)."""
    node = value.node
    if isinstance(node, Leaf) and node.map == identity(node.tensor.rank) and node.tensor.shape == value.shape:
        return node.tensor
    return None
