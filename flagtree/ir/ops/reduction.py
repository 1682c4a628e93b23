"""Reductions over `dims` (with `keepdim`), softmax, cumulative sums, top-k and sort."""

from __future__ import annotations

from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.opdef import PURE, REDUCTION, AttrSpec, OpDef, register
from flagtree.ir.ops._util import normalize_dim, tensor_operand
from flagtree.ir.types import I1, I64, ScalarType, TensorType, Type

_REDUCE_ATTRS = {
    "dims": AttrSpec((tuple,), "dimensions to reduce; empty = all"),
    "keepdim": AttrSpec((bool,), "keep reduced dims as size 1"),
}


def _reduced_shape(op: Operation) -> tuple[tuple[int | None, ...], tuple[int, ...]] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dims = op.attributes.get("dims", ())
    normalized = []
    for d in dims or tuple(range(x.rank)):
        n = normalize_dim(d, x.rank)
        if isinstance(n, str):
            return n
        normalized.append(n)
    if len(set(normalized)) != len(normalized):
        return f"dims {dims} repeat a dimension"
    keep = op.attributes.get("keepdim", False)
    if keep:
        shape = tuple(1 if i in normalized else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in normalized)
    return shape, tuple(normalized)


def _reduction_infer(result_dtype: ScalarType | None, float_only: bool = False):
    def infer(op: Operation) -> list[Type] | str:
        reduced = _reduced_shape(op)
        if isinstance(reduced, str):
            return reduced
        x = op.operands[0].type
        if float_only and not x.dtype.is_float:
            return f"'{op.name}' needs a floating-point operand, not {x.dtype}"
        return [TensorType(reduced[0], result_dtype or x.dtype)]

    return infer


def _reduction_reference(fn):
    def reference(args: list[Any], attrs: dict, result_types: list[Type]) -> Any:
        (x,) = args
        dims = list(attrs["dims"]) or list(range(x.dim()))
        out = fn(x, dims, attrs["keepdim"], attrs)
        return out.to(result_types[0].dtype.torch_dtype)

    return reference


_REDUCTIONS = {
    "sum": ("sum of elements", lambda x, d, k, a: torch.sum(x, d, keepdim=k), None, False),
    "prod": ("product of elements", lambda x, d, k, a: _prod(x, d, k), None, False),
    "mean": ("arithmetic mean", lambda x, d, k, a: torch.mean(x, d, keepdim=k), None, True),
    "amax": ("maximum (NaN-propagating)", lambda x, d, k, a: torch.amax(x, d, keepdim=k), None, False),
    "amin": ("minimum (NaN-propagating)", lambda x, d, k, a: torch.amin(x, d, keepdim=k), None, False),
    "any": ("logical or of x != 0", lambda x, d, k, a: torch.any(x, dim=tuple(d), keepdim=k), I1, False),
    "all": ("logical and of x != 0", lambda x, d, k, a: torch.all(x, dim=tuple(d), keepdim=k), I1, False),
    "var": ("variance with `correction` (Bessel: 1)",
            lambda x, d, k, a: torch.var(x, d, correction=a.get("correction", 1), keepdim=k), None, True),
}


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if x.is_floating_point():  # torch multiplies bf16/f16 in their own precision; round once instead
        x = x.double()
    # Reduce the highest dim first so the remaining ones keep their index; normalise first,
    # as a negative dim would shift once a dim is gone.
    for d in sorted((d % max(x.dim(), 1) for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


for _name, (_doc, _fn, _dtype, _float_only) in _REDUCTIONS.items():
    _attrs = dict(_REDUCE_ATTRS)
    if _name == "var":
        _attrs["correction"] = AttrSpec((int, float), "subtracted from the element count", required=False)
    register(OpDef(f"ft.{_name}", _doc, (1, 1), attrs=_attrs, traits=frozenset({PURE, REDUCTION}),
                   infer=_reduction_infer(_dtype, _float_only), reference=_reduction_reference(_fn)))


def _infer_arg_reduce(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    if x.dtype == I1:
        return f"'{op.name}' does not order i1 values; ft.cast the operand to an integer type"
    dim = normalize_dim(op.attributes["dim"], x.rank)
    if isinstance(dim, str):
        return dim
    keep = op.attributes["keepdim"]
    shape = tuple(1 if i == dim else d for i, d in enumerate(x.shape) if keep or i != dim)
    return [TensorType(shape, I64)]


for _name, _fn in (("argmax", torch.argmax), ("argmin", torch.argmin)):
    register(OpDef(
        f"ft.{_name}", f"index of the first {_name[3:]}imum along `dim`", (1, 1),
        attrs={"dim": AttrSpec((int,), "dimension"), "keepdim": AttrSpec((bool,), "keep `dim` as size 1")},
        traits=frozenset({PURE, REDUCTION}), infer=_infer_arg_reduce,
        reference=lambda args, attrs, rt, fn=_fn: fn(args[0], attrs["dim"], keepdim=attrs["keepdim"]),
    ))


def _infer_along_dim(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dim = normalize_dim(op.attributes["dim"], x.rank)
    if isinstance(dim, str):
        return dim
    result = op.results[0].type if op.results else x
    if not isinstance(result, TensorType) or result.shape != x.shape:
        return f"result must have the operand's shape {list(x.shape)}"
    if not x.dtype.is_float or not result.dtype.is_float:
        return "softmax needs floating-point operand and result"
    return [result]


def _softmax_reference(fn):
    def reference(args: list[Any], attrs: dict, result_types: list[Type]) -> Any:
        return fn(args[0], attrs["dim"], dtype=result_types[0].dtype.torch_dtype)

    return reference


_DIM = {"dim": AttrSpec((int,), "the dimension")}
register(OpDef("ft.softmax", "exp(x - max) / sum(exp(x - max)) along `dim`, computed in the result type",
               (1, 1), attrs=_DIM, infer=_infer_along_dim, reference=_softmax_reference(torch.softmax)))
register(OpDef("ft.log_softmax", "log of softmax along `dim`, computed in the result type", (1, 1), attrs=_DIM,
               infer=_infer_along_dim, reference=_softmax_reference(torch.log_softmax)))


def _infer_cumsum(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dim = normalize_dim(op.attributes["dim"], x.rank)
    return dim if isinstance(dim, str) else [x]


register(OpDef("ft.cumsum", "inclusive prefix sum along `dim`", (1, 1), attrs=_DIM, infer=_infer_cumsum,
               reference=lambda args, attrs, rt: torch.cumsum(args[0], attrs["dim"]).to(args[0].dtype)))


def _infer_topk(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    if x.dtype == I1:
        return "ft.topk does not order i1 values; ft.cast the operand to an integer type"
    dim = normalize_dim(op.attributes["dim"], x.rank)
    if isinstance(dim, str):
        return dim
    k = op.attributes["k"]
    if x.shape[dim] is not None and not 0 <= k <= x.shape[dim]:
        return f"k = {k} exceeds dim {dim} of size {x.shape[dim]}"
    shape = tuple(k if i == dim else d for i, d in enumerate(x.shape))
    return [TensorType(shape, x.dtype), TensorType(shape, I64)]


register(OpDef(
    "ft.topk", "the k largest (or smallest) values along `dim` and their indices", (1, 1), results=(2, 2),
    attrs={"k": AttrSpec((int,), "how many"), "dim": AttrSpec((int,), "the dimension"),
           "largest": AttrSpec((bool,), "largest (true) or smallest"),
           "sorted": AttrSpec((bool,), "return values in sorted order")},
    infer=_infer_topk,
    reference=lambda args, a, rt: tuple(torch.topk(args[0], a["k"], a["dim"], a["largest"], a["sorted"])),
))


def _infer_sort(op: Operation) -> list[Type] | str:
    x = tensor_operand(op)
    if isinstance(x, str):
        return x
    dim = normalize_dim(op.attributes["dim"], x.rank)
    return dim if isinstance(dim, str) else [x, TensorType(x.shape, I64)]


register(OpDef(
    "ft.sort", "values sorted along `dim` and the permutation indices", (1, 1), results=(2, 2),
    attrs={"dim": AttrSpec((int,), "the dimension"), "descending": AttrSpec((bool,), "descending order"),
           "stable": AttrSpec((bool,), "keep equal elements in order")},
    infer=_infer_sort,
    reference=lambda args, a, rt: tuple(torch.sort(args[0], dim=a["dim"], descending=a["descending"],
                                                   stable=a["stable"])),
))
