"""fuse-gather-matmul: a batched matmul of gathered weights becomes one `ft.gather_matmul`, which
then reads its operands in the layouts they arrive in.

An MoE layer that routes each token to its experts by gathering their weights writes

    %g = ft.index(%w, %idx) {dims = [0]}          // [B, K, N]: expert idx[b]'s matrix, per b
    %t = ft.transpose(%g) {perm = [0, 2, 1]}      // optional: any perm that keeps dim 0 first
    %y = ft.matmul(%x, %t)                         // [B, M, K] @ [B, K, N]

which copies one weight matrix per token (B ≫ E experts) only to read each once.  The first
pattern rewrites it to `%y = ft.gather_matmul(%x, %w', %idx)` with `%w' = ft.transpose(%w)`
(the same perm; omitted without one): transposing before or after the gather gives the same
rows, as the gather only picks along dim 0, so out[b] = x[b] @ w'[idx[b]] is unchanged.
Constraints, each checked before anything changes:
- the gather is an `ft.index` of a rank-3 tensor along dim 0 with one 1-D integer index;
- the transpose, when present, keeps dim 0 in place;
- `%x` is rank 3 with the same batch size B as the gathered operand (no batch broadcast),
  and `%x` and the weights have one floating-point element type.

The second pattern takes the copies out of an `ft.gather_matmul`'s operands, which a backend
would otherwise make before every call:
- weights `ft.transpose(%w0) {perm = [0, 2, 1]}` (nn.Linear-layout experts [E, N, K] used as
  [E, K, N]) become `%w0` read with `transpose_w` flipped; other perms stay explicit;
- an x that repeats each entry r times along dim 0 (`x.repeat_interleave(r, 0)`, which FTIR
  spells `ft.reshape(ft.broadcast_to(%s))`) becomes the entries themselves with `x_repeat`
  multiplied by r.  Constraints: `%s` is [B0, 1, d...] and the broadcast only grows its dim 1 to
  a static r > 1 (same rank; every other dim static and equal, or dynamic on both sides, which
  torch.compile never broadcasts as it specialises size 1); the reshape to [B0·r, M, K] keeps
  every entry whole: d... and M, K are static with prod(d) = M·K.  Then x[b] is entry b // r of
  `%s` viewed as [B0, M, K].
Producers nothing else reads any more (gather, transpose, broadcast) are erased.

Which backends run it is their choice (their pipeline): one that computes the gathered
product without copying the weights gains from it; `ft.gather_matmul`'s reference is the
gather followed by the matmul, so any backend can still run it.
"""

from __future__ import annotations

import math
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
    """Rewrite matmul(x, [transpose](index(w, idx))) to ft.gather_matmul(x, [transpose](w), idx), then
    fold a [0, 2, 1] transpose of its weights and a repeat of its x into its attributes."""

    name: ClassVar[str] = "fuse-gather-matmul"

    def run(self, module: Module) -> bool:
        # A matmul becomes an ft.gather_matmul in one sweep, its operands are folded in the next, and
        # one more finds nothing left (each fold removes a transpose or a repeat, so this terminates).
        return apply_patterns(module, _patterns, max_iterations=4)


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


@_patterns.pattern("ft.gather_matmul")
def _operands_in_place(op: Operation) -> bool:
    x, weights, index = op.operands
    transpose = _producer(weights, "ft.transpose")
    swaps_last_dims = transpose is not None and transpose.attributes["perm"] == (0, 2, 1)
    repeat = _repeated_entries(x)
    if not swaps_last_dims and repeat is None:
        return False
    builder = Builder.before_op(op)
    attributes = dict(op.attributes)
    if swaps_last_dims:
        weights = transpose.operands[0]
        attributes["transpose_w"] = not attributes.get("transpose_w", False)
        if not attributes["transpose_w"]:
            del attributes["transpose_w"]  # the default: printed as it was before any fold
    if repeat is not None:
        entries, times = repeat
        x = _as_entries(builder, entries, x.type)
        attributes["x_repeat"] = attributes.get("x_repeat", 1) * times
    replace_op(op, [builder.value("ft.gather_matmul", x, weights, index, result_type=op.results[0].type,
                                  **attributes)])
    return True


def _repeated_entries(x: Value) -> tuple[Value, int] | None:
    """(%s, r) when `x` = reshape(broadcast_to(%s)) repeats each entry of %s r times along dim 0
    (the module docstring's constraints), else None."""
    reshape = _producer(x, "ft.reshape")
    broadcast = _producer(reshape.operands[0], "ft.broadcast_to") if reshape else None
    if broadcast is None:
        return None
    source, grown = broadcast.operands[0].type, broadcast.results[0].type
    if source.rank != grown.rank or source.rank < 2 or source.shape[1] != 1:
        return None
    times, rest = grown.shape[1], source.shape[2:]
    others_kept = all(a == b for dim, (a, b) in enumerate(zip(source.shape, grown.shape)) if dim != 1)
    if times is None or times < 2 or not others_kept:
        return None
    _, rows, depth = x.type.shape
    if None in rest or rows is None or depth is None or math.prod(rest) != rows * depth:
        return None
    return broadcast.operands[0], times


def _as_entries(builder: Builder, source: Value, x_type: TensorType) -> Value:
    """`source` [B0, 1, d...] viewed as [B0, M, K] (M, K: x_type's), itself when it has that shape."""
    shape = (source.type.shape[0], *x_type.shape[1:])
    if source.type.shape == shape:
        return source
    sizes = [builder.value("ft.dim", source, dim=0)] if shape[0] is None else []
    return builder.value("ft.reshape", source, *sizes, result_type=TensorType(shape, x_type.dtype))
