"""The cpu kernel of one `ft.gather_matmul`: out[b] = x[b] @ w[index[b]], no weights copied.

Semantics are flagtree/ir/ops/linalg.py's.  A work item is one batch entry b (the wrapper in
kernel.py gives each core a range of them).  Per item, in the compute type (f32; f64 for f64):

    e = index[b], plus E when negative (aten.index semantics; range checked by the launch plan)
    for each row m of x[b]:
        acc[:] = 0
        for k:  acc[:] += x[b, m, k] · w[e, k, :]      (an axpy over a contiguous row of w[e])
        out[b, m, :] = acc                              (rounded once to bf16/f16)

The innermost loop walks a contiguous weight row and the accumulator, which LLVM vectorises;
w[e] stays in cache across the tokens routed to expert e.  Accumulating in f32 and rounding
once is what torch's CPU matmul does for bf16/f16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flagtree.backends.cpu import scalar_ops
from flagtree.backends.cpu.emitter import EmittedKernel
from flagtree.backends.cpu.mlir_text import FunctionWriter, compute_type, is_narrow_float, memref_type, storage_type
from flagtree.ir.core import Operation
from flagtree.ir.types import TensorType


def emit_gather_matmul(op: Operation, name: str) -> EmittedKernel:
    """The MLIR function computing one ft.gather_matmul op.  It takes x, w, index, the output
    (memrefs), then the range `%lo, %hi` of batch entries to compute."""
    return _GatherMatmulEmitter(op, name).emit()


def work_items(args: Sequence[Any], shapes: list[tuple[int, ...]]) -> int:
    """A call's work items: its batch entries."""
    return shapes[0][0]


def check_index(index: torch.Tensor, experts: int) -> torch.Tensor:
    """`index` after checking that every entry picks one of `experts` matrices (negative entries
    count from the end); raises IndexError as aten.index does, since the kernel reads w[index]
    unchecked."""
    if index.numel():
        low, high = (bound.item() for bound in torch.aminmax(index))
        if low < -experts or high >= experts:
            bad = index[(index < -experts) | (index >= experts)][0].item()
            raise IndexError(f"index {bad} is out of bounds for dimension 0 with size {experts}")
    return index


class _GatherMatmulEmitter:
    def __init__(self, op: Operation, name: str):
        self.op = op
        self.name = name
        self.w = FunctionWriter()
        dtype = op.operands[0].type.dtype
        self.storage = storage_type(dtype)
        self.compute = compute_type(dtype)
        self.narrow_float = is_narrow_float(dtype)
        self.index_type = storage_type(op.operands[2].type.dtype)
        self.names = ("%x", "%w", "%index", "%out")

    def emit(self) -> EmittedKernel:
        types: list[TensorType] = [*(v.type for v in self.op.operands), self.op.results[0].type]
        self.memrefs = [memref_type(t.shape, storage_type(t.dtype)) for t in types]
        params = [f"{ssa}: {memref}" for ssa, memref in zip(self.names, self.memrefs)]
        params += ["%lo: index", "%hi: index"]
        experts, rows = self._dim(1, 0), self._dim(0, 1)
        self.depth, self.cols = self._dim(0, 2), self._dim(1, 2)
        # On the stack: LLVM then knows it aliases no operand and vectorises the axpy (the aligned heap
        # buffer memref.alloc makes hides that behind pointer arithmetic: 2.5x slower, measured).
        self.acc = self.w.emit(f"memref.alloca({self.cols}) {{alignment = 64 : i64}} : {self.acc_type}", "acc")
        with self.w.loop("%lo", "%hi") as b:
            expert = self._expert(self._load(2, [b]), experts)
            with self.w.loop(0, rows) as m:
                self._row(b, m, expert)
        self.w.line("return")
        text = (f"  func.func @{self.name}({', '.join(params)}) attributes {{llvm.emit_c_interface}} {{\n"
                + "\n".join(self.w.body()) + "\n  }\n")
        return EmittedKernel(self.name, text, frozenset(self.w.helpers))

    @property
    def acc_type(self) -> str:
        return f"memref<?x{self.compute}>"

    def _row(self, b: str, m: str, expert: str) -> None:
        """out[b, m, :] = x[b, m, :] @ w[expert], accumulated in `acc`."""
        with self.w.loop(0, self.cols) as n:
            self.w.line(f"memref.store {self.w.constant(0.0, self.compute)}, {self.acc}[{n}] : {self.acc_type}")
        with self.w.loop(0, self.depth) as k:
            scale = self._widen(self._load(0, [b, m, k]))
            with self.w.loop(0, self.cols) as n:
                weight = self._widen(self._load(1, [expert, k, n]))
                total = self.w.emit(f"memref.load {self.acc}[{n}] : {self.acc_type}")
                updated = self.w.emit(f"math.fma {scale}, {weight}, {total} : {self.compute}")
                self.w.line(f"memref.store {updated}, {self.acc}[{n}] : {self.acc_type}")
        with self.w.loop(0, self.cols) as n:
            total = self.w.emit(f"memref.load {self.acc}[{n}] : {self.acc_type}")
            self.w.line(f"memref.store {self._narrow(total)}, {self.names[3]}[{b}, {m}, {n}] : {self.memrefs[3]}")

    def _expert(self, raw: str, experts: str) -> str:
        """The matrix an index entry picks: negative entries count from the end."""
        entry = self.w.emit(f"arith.index_cast {raw} : {self.index_type} to index")
        negative = self.w.emit(f"arith.cmpi slt, {entry}, {self.w.index(0)} : index")
        wrapped = self.w.emit(f"arith.addi {entry}, {experts} : index")
        return self.w.emit(f"arith.select {negative}, {wrapped}, {entry} : index")

    def _dim(self, operand: int, dim: int) -> str:
        size = self.op.operands[operand].type.shape[dim]
        if size is not None:
            return self.w.index(size)
        return self.w.emit(f"memref.dim {self.names[operand]}, {self.w.index(dim)} : {self.memrefs[operand]}", "d")

    def _load(self, operand: int, indices: list[str]) -> str:
        return self.w.emit(f"memref.load {self.names[operand]}[{', '.join(indices)}] : {self.memrefs[operand]}")

    def _widen(self, x: str) -> str:
        return scalar_ops.widen(self.w, x, self.storage) if self.narrow_float else x

    def _narrow(self, x: str) -> str:
        return scalar_ops.narrow(self.w, x, self.storage) if self.narrow_float else x
