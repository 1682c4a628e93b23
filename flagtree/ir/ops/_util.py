"""Helpers shared by the op definitions: type queries and inference building blocks."""

from __future__ import annotations

from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.types import I64, ScalarType, TensorType, Type, broadcast_shapes


def shape_of(t: Type) -> tuple[int | None, ...]:
    return t.shape if isinstance(t, TensorType) else ()


def elem_of(t: Type) -> ScalarType:
    return t.dtype if isinstance(t, TensorType) else t


def like(shape: tuple[int | None, ...], dtype: ScalarType, tensor: bool = True) -> Type:
    return TensorType(tuple(shape), dtype) if tensor else dtype


def normalize_dim(dim: int, rank: int) -> int | str:
    """`dim` in [0, rank), or an error string."""
    if not -max(rank, 1) <= dim < max(rank, 1):
        return f"dim {dim} is out of range for rank {rank}"
    return dim % max(rank, 1)


def tensor_operand(op: Operation, index: int = 0) -> TensorType | str:
    t = op.operands[index].type
    if not isinstance(t, TensorType):
        return f"operand #{index} must be a tensor, not {t}"
    return t


def sized_result(op: Operation, first_size_operand: int) -> list[Type] | str:
    """Result type for ops whose output shape is the declared result type, with one i64
    operand per dynamic (`?`) dim starting at `first_size_operand`."""
    result = op.results[0].type if op.results else None
    if not isinstance(result, TensorType):
        return "the result must be a tensor type"
    sizes = op.operands[first_size_operand:]
    dynamic = sum(d is None for d in result.shape)
    if len(sizes) != dynamic:
        return f"result {result} has {dynamic} dynamic dims but the op has {len(sizes)} size operands"
    for v in sizes:
        if v.type != I64:
            return f"size operands must be i64, not {v.type}"
    return [result]


def runtime_shape(result: TensorType, sizes: list[Any]) -> list[int]:
    """The concrete shape of a sized result: static dims from the type, `?` from `sizes`."""
    it = iter(sizes)
    return [int(next(it)) if d is None else d for d in result.shape]


def torch_dtype(t: Type) -> torch.dtype:
    return elem_of(t).torch_dtype


def broadcast_or_error(types: list[Type]) -> tuple[int | None, ...] | str:
    try:
        return broadcast_shapes(*(shape_of(t) for t in types))
    except ValueError as e:
        return str(e)
