"""Which values of a kernel unit vary along its row axis, so the kernel can work in row blocks.

A kernel whose every result has the same leading dim (the "row axis": the batch or token
dim of an LLM activation) computes each block of rows from the same rows of its inputs.
Such a kernel takes a row range [lo, hi) and walks it in blocks small enough to stay in
cache: a softmax or norm block is read from memory once, not once per reduction, and
several threads can each take a range of rows.  `row_values` finds, from the results
backwards, every value whose dim 0 is the row axis; inputs that do not vary along it
(biases, weights, size-1 dims) are read whole.
"""

from __future__ import annotations

from flagtree.backends.cpu.emitter import ARG_REDUCTIONS, REDUCTIONS, SOFTMAX, KernelUnit
from flagtree.ir.core import Operation, Value
from flagtree.ir.opdef import ELEMENTWISE, has_trait
from flagtree.ir.types import TensorType

_ALONG_DIM = SOFTMAX | ARG_REDUCTIONS  # ops with a `dim` attribute they reduce along


class _NotTileable(Exception):
    pass


def row_values(unit: KernelUnit) -> frozenset[int] | None:
    """The ids of the unit's values (arguments included) whose dim 0 is the row axis, or
    None when the unit cannot be computed row block by row block."""
    results = [r for r in unit.results if isinstance(r.type, TensorType)]
    if len(results) != len(unit.results) or not results:
        return None
    if any(r.type.rank == 0 or r.type.shape[0] == 1 for r in results):
        return None
    rows: set[int] = set()
    producers = {id(r): op for op in unit.ops for r in op.results}
    try:
        pending = list(results)
        while pending:
            value = pending.pop()
            if id(value) in rows:
                continue
            rows.add(id(value))
            op = producers.get(id(value))
            if op is not None:
                pending.extend(_row_operands(op, value))
        _check_consistent(unit, rows)
        _check_one_row_count(unit, rows)
    except _NotTileable:
        return None
    return frozenset(rows)


def _row_operands(op: Operation, result: Value) -> list[Value]:
    """The operands of `op` whose dim 0 is the row axis when `result`'s is; raises
    _NotTileable when a row of the result needs more than the same row of an operand."""
    if has_trait(op, ELEMENTWISE) or op.name == "ft.broadcast_to":
        tensors = [v for v in op.operands if isinstance(v.type, TensorType)]
        return [v for v in tensors if v.type.rank == result.type.rank and v.type.shape[0] != 1]
    if op.name in REDUCTIONS:
        dims = op.attributes["dims"]
        rank = op.operands[0].type.rank
        if not dims or 0 in {d % rank for d in dims}:
            raise _NotTileable
        return [op.operands[0]]
    if op.name in _ALONG_DIM:
        if op.attributes["dim"] % op.operands[0].type.rank == 0:
            raise _NotTileable
        return [op.operands[0]]
    if op.name == "ft.transpose" and op.attributes["perm"][0] == 0:
        return [op.operands[0]]
    if op.name == "ft.slice" and op.attributes["dim"] % op.operands[0].type.rank != 0:
        return [op.operands[0]]
    if op.name == "ft.reshape" and _keeps_leading_dim(op.operands[0].type, result.type):
        return [op.operands[0]]
    if op.name == "ft.full":
        return []
    raise _NotTileable


def _keeps_leading_dim(source: TensorType, target: TensorType) -> bool:
    """A reshape that leaves dim 0 alone: the same static size, or both dynamic (then the
    kernel checks at run time that they are equal, see kernel.py)."""
    return source.rank > 0 and source.shape[0] == target.shape[0]


def _check_consistent(unit: KernelUnit, rows: set[int]) -> None:
    """Every use of a row value must treat dim 0 as rows: a row value read where the
    reader's rows are not its rows (a broadcast into a bigger rank, a reduction over it)
    would need every row at once.  ft.dim of dim 0 would read a block's size, not the
    tensor's, so it is refused too."""
    for op in unit.ops:
        operand_rows = [id(v) in rows for v in op.operands]
        if not any(operand_rows):
            continue
        if op.name == "ft.dim":
            if op.attributes["dim"] % op.operands[0].type.rank == 0:
                raise _NotTileable
            continue
        if not all(id(r) in rows for r in op.results):
            raise _NotTileable
        for value, is_row in zip(op.operands, operand_rows):
            if is_row and value.type.rank != op.results[0].type.rank and op.name not in REDUCTIONS | _ALONG_DIM:
                raise _NotTileable


def _check_one_row_count(unit: KernelUnit, rows: set[int]) -> None:
    """All row values must have one dim-0 size: one static size, or all dynamic (their
    run-time sizes are checked equal before the kernel runs)."""
    values = [*unit.args, *(r for op in unit.ops for r in op.results)]
    leading = {v.type.shape[0] for v in values if id(v) in rows}
    if len(leading) != 1:
        raise _NotTileable
