"""Matrix products and convolution."""

from __future__ import annotations

from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.opdef import FUSED, PURE, AttrSpec, OpDef, register
from flagtree.ir.types import TensorType, Type, broadcast_shapes


def _infer_matmul(op: Operation) -> list[Type] | str:
    a, b = (v.type for v in op.operands)
    if not (isinstance(a, TensorType) and isinstance(b, TensorType)) or a.rank < 2 or b.rank < 2:
        return f"matmul needs operands of rank >= 2, got {a} and {b}"
    if a.dtype != b.dtype:
        return f"matmul operands must share an element type (insert ft.cast); got {a.dtype} and {b.dtype}"
    if a.dtype.name == "i1":
        return "matmul is not defined on i1; ft.cast the operands to a numeric type"
    k1, k2 = a.shape[-1], b.shape[-2]
    if k1 is not None and k2 is not None and k1 != k2:
        return f"contraction dims differ: {a} @ {b}"
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        return f"batch dims of {a} and {b} do not broadcast"
    return [TensorType((*batch, a.shape[-2], b.shape[-1]), a.dtype)]


register(OpDef("ft.matmul", "batched matrix product a @ b (batch dims broadcast, rank >= 2)", (2, 2),
               infer=_infer_matmul, reference=lambda args, a, rt: torch.matmul(args[0], args[1])))


GATHER_MATMUL_ATTRS = {
    "transpose_w": AttrSpec((bool,), "w is [E, N, K] and each gathered matrix is read transposed (BLAS's transB): "
                            "nn.Linear-layout experts used as they are", required=False),
    "x_repeat": AttrSpec((int,), "x holds B / x_repeat batch entries, each read by x_repeat consecutive index "
                         "entries (x.repeat_interleave(x_repeat, 0) used without the copy); default 1",
                         required=False),
}


def _infer_gather_matmul(op: Operation) -> list[Type] | str:
    x, w, index = (v.type for v in op.operands)
    transpose_w = op.attributes.get("transpose_w", False)
    repeat = op.attributes.get("x_repeat", 1)
    w_layout = "[E, N, K]" if transpose_w else "[E, K, N]"
    if not all(isinstance(t, TensorType) for t in (x, w, index)) or (x.rank, w.rank, index.rank) != (3, 3, 1):
        return f"gather_matmul needs x [B, M, K], w {w_layout} and index [B], got {x}, {w} and {index}"
    if x.dtype != w.dtype or not x.dtype.is_float:
        return f"gather_matmul needs x and w of one floating-point element type, got {x.dtype} and {w.dtype}"
    if index.dtype.name not in ("i64", "i32"):
        return f"gather_matmul's index must be an i64 or i32 tensor, not {index}"
    if repeat < 1:
        return f"gather_matmul's x_repeat must be at least 1 (1: x has one entry per index entry), got {repeat}"
    depth, cols = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    x_batch = x.shape[0] * repeat if x.shape[0] is not None else None
    for what, a, b in (("batch", x_batch, index.shape[0]), ("contraction", x.shape[2], depth)):
        if a is not None and b is not None and a != b:
            return (f"gather_matmul's {what} dims differ: x {x} (x_repeat {repeat}), w {w} "
                    f"(transpose_w {transpose_w}), index {index}")
    batch = x_batch if x_batch is not None else index.shape[0]
    return [TensorType((batch, x.shape[1], cols), x.dtype)]


def _gather_matmul(args: list[Any], a: dict, rt: list[Type]) -> torch.Tensor:
    x, w, index = args
    weights = w[index]
    if a.get("transpose_w", False):
        weights = weights.transpose(1, 2)
    return torch.matmul(x.repeat_interleave(a.get("x_repeat", 1), 0), weights)


register(OpDef("ft.gather_matmul", "out[b] = x[b // x_repeat] @ op(w[index[b]]), op = transpose when transpose_w: "
               "a batched matmul whose right operands are gathered (an MoE's expert weights; aten.index semantics "
               "for index)", (3, 3), attrs=GATHER_MATMUL_ATTRS,
               traits=frozenset({PURE, FUSED}), infer=_infer_gather_matmul, reference=_gather_matmul,
               operand_doc="x [B / x_repeat, M, K], w [E, K, N] ([E, N, K] when transpose_w), index [B] (i64/i32)"))

_CONV_ATTRS = {
    "stride": AttrSpec((tuple,), "stride per spatial dim"),
    "padding": AttrSpec((tuple,), "zero padding per spatial dim"),
    "dilation": AttrSpec((tuple,), "dilation per spatial dim"),
    "groups": AttrSpec((int,), "channel groups"),
    "transposed": AttrSpec((bool,), "transposed (fractionally strided) convolution"),
    "output_padding": AttrSpec((tuple,), "extra size for transposed convolution"),
}


def _infer_conv(op: Operation) -> list[Type] | str:
    x, w = op.operands[0].type, op.operands[1].type
    if not (isinstance(x, TensorType) and isinstance(w, TensorType)) or x.rank != w.rank or x.rank < 3:
        return f"conv needs input and weight of equal rank >= 3, got {x} and {w}"
    types = {v.type.dtype for v in op.operands if isinstance(v.type, TensorType)}
    if len(types) != 1:
        return "conv operands must share an element type"
    spatial = x.rank - 2
    for key in ("stride", "padding", "dilation", "output_padding"):
        if len(op.attributes[key]) != spatial:
            return f"'{key}' needs {spatial} entries"
    return [op.results[0].type] if op.results else "conv needs a result type"


def _conv(args: list[Any], a: dict, rt: list[Type]) -> torch.Tensor:
    x, w, *bias = args
    return torch.ops.aten.convolution.default(
        x, w, bias[0] if bias else None, list(a["stride"]), list(a["padding"]), list(a["dilation"]),
        a["transposed"], list(a["output_padding"]), a["groups"])


register(OpDef("ft.conv", "N-d convolution (aten.convolution semantics)", (2, 3), attrs=_CONV_ATTRS,
               infer=_infer_conv, reference=_conv, operand_doc="x, weight, optional bias"))
