"""Shape and data-movement ops: reshape, transpose, broadcast_to, slice, concat, pad,
flip, gather/scatter and indexing, plus `ft.dim` to read a (symbolic) size.

Sized ops (`reshape`, `broadcast_to`) take their output shape from the result type; each
dynamic (`?`) result dim is supplied by one i64 operand, in order.
"""

from __future__ import annotations

from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.opdef import PURE, SHAPE, AttrSpec, OpDef, register
from flagtree.ir.ops._util import normalize_dim, runtime_shape, sized_result, tensor_operand
from flagtree.ir.types import I64, TensorType, Type, broadcast_shapes

_SHAPE = frozenset({PURE, SHAPE})


def _infer_reshape(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    result = sized_result(op, 1)
    if isinstance(result, str):
        return result
    out = result[0]
    if out.dtype != x.dtype:
        return f"reshape keeps the element type {x.dtype}"
    if x.is_static and out.is_static and x.numel() != out.numel():
        return f"cannot reshape {x} ({x.numel()} elements) to {out} ({out.numel()} elements)"
    return result


register(OpDef("ft.reshape", "same elements in row-major order, new shape (the result type)", (1, None),
               infer=_infer_reshape, traits=_SHAPE, operand_doc="x, then one i64 per dynamic result dim",
               reference=lambda args, a, rt: args[0].reshape(runtime_shape(rt[0], args[1:]))))


def unit_dim_map(source: tuple[int | None, ...], target: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """If reshaping `source` to `target` only inserts or drops size-1 dims: for each source dim,
    the target dim it becomes (None for a dropped one); else None.  The other dims must match in
    order with at most one `?` among them: equal element counts then make the `?`s equal too."""
    source_dims = [k for k, d in enumerate(source) if d != 1]
    target_dims = [k for k, d in enumerate(target) if d != 1]
    if [source[k] for k in source_dims] != [target[k] for k in target_dims]:
        return None
    if sum(source[k] is None for k in source_dims) > 1:
        return None
    to_target = dict(zip(source_dims, target_dims))
    return tuple(to_target.get(k) for k in range(len(source)))


def _infer_broadcast_to(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    result = sized_result(op, 1)
    if isinstance(result, str):
        return result
    out = result[0]
    try:
        if out.dtype != x.dtype or (broadcast_shapes(x.shape, out.shape) != out.shape and out.is_static):
            return f"{x} does not broadcast to {out}"
    except ValueError:
        return f"{x} does not broadcast to {out}"
    return result


register(OpDef("ft.broadcast_to", "repeat size-1 (or missing leading) dims up to the result shape", (1, None),
               infer=_infer_broadcast_to, traits=_SHAPE, operand_doc="x, then one i64 per dynamic result dim",
               reference=lambda args, a, rt: args[0].expand(runtime_shape(rt[0], args[1:]))))


def _infer_transpose(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    perm = op.attributes["perm"]
    if sorted(perm) != list(range(x.rank)):
        return f"perm {list(perm)} is not a permutation of 0..{x.rank - 1}"
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


register(OpDef("ft.transpose", "permute dims: result dim i is operand dim perm[i]", (1, 1),
               attrs={"perm": AttrSpec((tuple,), "the permutation")}, infer=_infer_transpose, traits=_SHAPE,
               reference=lambda args, a, rt: args[0].permute(a["perm"])))


def _slice_len(size: int | None, start: int, end: int, step: int) -> int | None:
    if size is None:
        return None
    return len(range(*slice(start, end, step).indices(size)))


def _infer_slice(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dim = normalize_dim(op.attributes["dim"], x.rank)
    if isinstance(dim, str):
        return dim
    start, end, step = (op.attributes[k] for k in ("start", "end", "step"))
    if step <= 0:
        return f"step must be positive, not {step}"
    shape = list(x.shape)
    shape[dim] = _slice_len(x.shape[dim], start, end, step)
    return [TensorType(tuple(shape), x.dtype)]


def _slice(args: list[Any], a: dict, rt: list[Type]) -> torch.Tensor:
    x = args[0]
    index = [slice(None)] * x.dim()
    index[a["dim"]] = slice(a["start"], a["end"], a["step"])
    return x[tuple(index)]


register(OpDef(
    "ft.slice", "x[start:end:step] along `dim` (Python slice semantics, ends clamped)", (1, 1),
    attrs={"dim": AttrSpec((int,), "the dimension"), "start": AttrSpec((int,), "first index"),
           "end": AttrSpec((int,), "one past the last index (clamped)"), "step": AttrSpec((int,), "positive stride")},
    infer=_infer_slice, traits=_SHAPE, reference=_slice,
))


def _infer_concat(op: Operation) -> list[Type] | str:
    types = [v.type for v in op.operands]
    if not all(isinstance(t, TensorType) for t in types):
        return "concat operands must be tensors"
    first = types[0]
    dim = normalize_dim(op.attributes["dim"], first.rank)
    if isinstance(dim, str):
        return dim
    size: int | None = 0
    for t in types:
        if t.rank != first.rank or t.dtype != first.dtype:
            return f"concat operands must share rank and element type; got {first} and {t}"
        for i, (a, b) in enumerate(zip(t.shape, first.shape)):
            if i != dim and a is not None and b is not None and a != b:
                return f"concat operands differ in dim {i}: {first} and {t}"
        size = None if size is None or t.shape[dim] is None else size + t.shape[dim]
    shape = list(first.shape)
    shape[dim] = size
    for i in range(len(shape)):
        if i != dim and shape[i] is None:
            shape[i] = next((t.shape[i] for t in types if t.shape[i] is not None), None)
    return [TensorType(tuple(shape), first.dtype)]


register(OpDef("ft.concat", "join tensors along `dim`", (1, None), attrs={"dim": AttrSpec((int,), "the dimension")},
               infer=_infer_concat, traits=_SHAPE, reference=lambda args, a, rt: torch.cat(args, a["dim"])))


def _infer_pad(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    pad = op.attributes["pad"]
    if len(pad) % 2 or len(pad) // 2 > x.rank:
        return f"pad {list(pad)} needs (before, after) pairs for at most {x.rank} trailing dims"
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        d = x.rank - 1 - i
        shape[d] = None if shape[d] is None else shape[d] + pad[2 * i] + pad[2 * i + 1]
    return [TensorType(tuple(shape), x.dtype)]


register(OpDef(
    "ft.pad", "constant padding, torch.nn.functional.pad order (last dim first, before/after; negative crops)",
    (1, 1), attrs={"pad": AttrSpec((tuple,), "(before, after) per trailing dim"),
                   "value": AttrSpec((int, float), "fill value")},
    infer=_infer_pad, traits=_SHAPE,
    reference=lambda args, a, rt: torch.nn.functional.pad(args[0], list(a["pad"]), value=a["value"]),
))


def _infer_flip(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    for d in op.attributes["dims"]:
        if isinstance(normalize_dim(d, x.rank), str):
            return normalize_dim(d, x.rank)
    return [x]


register(OpDef("ft.flip", "reverse the order of elements along `dims`", (1, 1),
               attrs={"dims": AttrSpec((tuple,), "dimensions to reverse")}, infer=_infer_flip, traits=_SHAPE,
               reference=lambda args, a, rt: torch.flip(args[0], a["dims"])))


def _index_operand_ok(op: Operation, first: int, last: int | None = None, masks: bool = True) -> str | None:
    """None if operands[first:last] are index tensors (i64/i32, or i1 masks when `masks`), else why not."""
    allowed = ("i64", "i32", "i1") if masks else ("i64", "i32")
    for v in op.operands[first:last]:
        if not isinstance(v.type, TensorType) or v.type.dtype.name not in allowed:
            kinds = "integer (or i1 mask)" if masks else "integer"
            return f"index operands must be {kinds} tensors, not {v.type}"
    return None


def _infer_gather(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    error = _index_operand_ok(op, 1, masks=False)
    if error:
        return error
    index = op.operands[1].type
    if index.rank != x.rank:
        return f"gather index rank {index.rank} must equal the operand rank {x.rank}"
    dim = normalize_dim(op.attributes["dim"], x.rank)
    return dim if isinstance(dim, str) else [TensorType(index.shape, x.dtype)]


register(OpDef("ft.gather", "out[i][j] = x[index[i][j]][j] along `dim` (torch.gather)", (2, 2),
               attrs={"dim": AttrSpec((int,), "the dimension")}, infer=_infer_gather, traits=_SHAPE,
               operand_doc="x, index (i64)", reference=lambda args, a, rt: torch.gather(args[0], a["dim"], args[1])))


def _infer_scatter(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    error = _index_operand_ok(op, 1, 2, masks=False)
    if error:
        return error
    if not isinstance(op.operands[2].type, TensorType) or op.operands[2].type.dtype != x.dtype:
        return f"scatter source must have element type {x.dtype}"
    if op.attributes["reduce"] not in ("none", "add"):
        return f"reduce must be \"none\" or \"add\", not \"{op.attributes['reduce']}\""
    return [x]


def _scatter(args: list[Any], a: dict, rt: list[Type]) -> torch.Tensor:
    x, index, src = args
    if a["reduce"] == "add":
        return torch.scatter_add(x, a["dim"], index, src)
    return torch.scatter(x, a["dim"], index, src)


register(OpDef(
    "ft.scatter", "copy of x with src written (or added) at index along `dim` (torch.scatter / scatter_add)",
    (3, 3), attrs={"dim": AttrSpec((int,), "the dimension"), "reduce": AttrSpec((str,), '"none" or "add"')},
    infer=_infer_scatter, traits=_SHAPE, operand_doc="x, index (i64), src", reference=_scatter,
))


def _infer_index(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    error = _index_operand_ok(op, 1)
    if error:
        return error
    return [op.results[0].type] if op.results else "ft.index needs a result type"


def _full_index(x: torch.Tensor, dims: tuple[int, ...], indices: list[torch.Tensor]) -> list[Any]:
    index: list[Any] = [None] * (max(dims) + 1 if dims else 0)
    for d, idx in zip(dims, indices):
        index[d] = idx
    return index


register(OpDef(
    "ft.index", "advanced indexing x[..., idx, ...]: index tensor k applies to dim dims[k] (aten.index)",
    (2, None), attrs={"dims": AttrSpec((tuple,), "the dim each index operand applies to, increasing")},
    infer=_infer_index, traits=_SHAPE, operand_doc="x, then index tensors",
    reference=lambda args, a, rt: torch.ops.aten.index.Tensor(args[0], _full_index(args[0], a["dims"], args[1:])),
))


def _infer_index_put(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    error = _index_operand_ok(op, 2)
    if error:
        return error
    if op.operands[1].type.dtype != x.dtype:
        return f"values must have element type {x.dtype}"
    return [x]


register(OpDef(
    "ft.index_put", "copy of x with values written (or accumulated) at x[..., idx, ...] (aten.index_put)",
    (3, None), attrs={"dims": AttrSpec((tuple,), "the dim each index operand applies to, increasing"),
                      "accumulate": AttrSpec((bool,), "add instead of overwrite")},
    infer=_infer_index_put, traits=_SHAPE, operand_doc="x, values, then index tensors",
    reference=lambda args, a, rt: torch.ops.aten.index_put.default(
        args[0], _full_index(args[0], a["dims"], args[2:]), args[1], a["accumulate"]),
))


def _infer_dim(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dim = normalize_dim(op.attributes["dim"], x.rank)
    return dim if isinstance(dim, str) else [I64]


register(OpDef("ft.dim", "the size of dimension `dim` as an i64 (symbolic sizes)", (1, 1),
               attrs={"dim": AttrSpec((int,), "the dimension")}, infer=_infer_dim, traits=_SHAPE,
               reference=lambda args, a, rt: int(args[0].shape[a["dim"]])))
