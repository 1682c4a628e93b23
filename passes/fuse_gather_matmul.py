"""fuse-gather-matmul: a batched matmul of gathered weights becomes one `ft.gather_matmul`.

An MoE layer that routes each token to its experts by gathering their weights writes

    %g = ft.index(%w, %idx) {dims = [0]}          // [B, K, N]: expert idx[b]'s matrix, per b
    %t = ft.transpose(%g) {perm = [0, 2, 1]}      // optional: any perm that keeps dim 0 first
    %y = ft.matmul(%x, %t)                         // [B, M, K] @ [B, K, N]

which copies one weight matrix per token (B ≫ E experts) only to read each once.  The
pattern rewrites it to `%y = ft.gather_matmul(%x, %w', %idx)` with `%w' = ft.transpose(%w)`
(the same perm; omitted without one): transposing before or after the gather gives the same
rows, as the gather only picks along dim 0, so out[b] = x[b] @ w'[idx[b]] is unchanged.
The transpose of `%w` moves E matrices, not B.

Constraints, each checked before anything changes:
- the gather is an `ft.index` of a rank-3 tensor along dim 0 with one 1-D integer index;
- the transpose, when present, keeps dim 0 in place;
- `%x` is rank 3 with the same batch size B as the gathered operand (no batch broadcast),
  and `%x` and the weights have one floating-point element type.
The gather and transpose are erased when nothing else reads them.

Which backends run it is their choice (their pipeline): one that computes the gathered
product without copying the weights gains from it; `ft.gather_matmul`'s reference is the
gather followed by the matmul, so any backend can still run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flagtree.ir.builder import Builder
from flagtree.ir.core import Module, Operation, OpResult, Value
from flagtree.ir.types import TensorType
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.rewrite import PatternSet, apply_patterns, replace_op

_patterns = PatternSet()


@register_pass
@dataclass(frozen=True)
class FuseGatherMatmul(Pass):
    """Rewrite matmul(x, [transpose](index(w, idx))) to ft.gather_matmul(x, [transpose](w), idx)."""

    name: ClassVar[str] = "fuse-gather-matmul"

    def run(self, module: Module) -> bool:
        return apply_patterns(module, _patterns, max_iterations=2)


@_patterns.pattern("ft.matmul")
def _gathered_weights(op: Operation) -> bool:
    x, right = op.operands
    transpose = _producer(right, "ft.transpose")
    gather = _producer(transpose.operands[0] if transpose else right, "ft.index")
    if gather is None or not _gathers_along_dim_0(gather) or not _same_batch(x, right):
        return False
    if transpose is not None and transpose.attributes["perm"][0] != 0:
        return False
    weights, index = gather.operands
    if not weights.type.dtype.is_float or x.type.dtype != weights.type.dtype:
        return False
    builder = Builder.before_op(op)
    if transpose is not None:
        weights = builder.value("ft.transpose", weights, perm=transpose.attributes["perm"])
    replace_op(op, [builder.value("ft.gather_matmul", x, weights, index, result_type=op.results[0].type)])
    return True


def _producer(value: Value, name: str) -> Operation | None:
    """The op named `name` that defines `value`, or None."""
    return value.op if isinstance(value, OpResult) and value.op.name == name else None


def _gathers_along_dim_0(gather: Operation) -> bool:
    """Whether `gather` picks whole matrices of a rank-3 tensor with one 1-D integer index."""
    if gather.attributes["dims"] != (0,) or len(gather.operands) != 2:
        return False
    weights, index = (v.type for v in gather.operands)
    return (isinstance(weights, TensorType) and weights.rank == 3 and isinstance(index, TensorType)
            and index.rank == 1 and index.dtype.name in ("i64", "i32"))


def _same_batch(x: Value, right: Value) -> bool:
    """Whether the matmul multiplies batch b of `x` with batch b of `right` (no broadcast): equal
    static sizes, or two dynamic ones (torch.compile specialises sizes 1, so those never broadcast)."""
    a, b = x.type, right.type
    return isinstance(a, TensorType) and a.rank == 3 and b.rank == 3 and a.shape[0] == b.shape[0]
