"""The cpu kernel of one `ft.gather_matmul`: out[b] = x[b // x_repeat] @ op(w[index[b]]), nothing copied.

Semantics are flagtree/ir/ops/linalg.py's.  A work item is one batch entry b (the wrapper in
kernel.py gives each core a range of them).  Per item, in the compute type (f32; f64 for f64):

    e = index[b], plus E when negative (aten.index semantics; range checked by the launch plan)
    xb = b // x_repeat                                  (x's entry, read in place: no repeated copy)
    for each row m of x[xb]:
      w [E, K, N]:                                      (an axpy over a contiguous row of w[e])
        acc[:] = 0
        for k:  acc[:] += x[xb, m, k] · w[e, k, :]
        out[b, m, :] = acc
      w [E, N, K] (transpose_w):                        (dot products over contiguous rows of w[e])
        for each block of `lanes` columns n0 ... n0 + lanes - 1 (lanes: one vector register's worth):
          p_n[:] = Σ over chunks c of k: x[xb, m, c] ⊙ w[e, n, c]    (a vector of partial sums per n)
          out[b, m, n0:n0 + lanes] = (Σ p_n0[:], ..., Σ p_n0+lanes-1[:])
        the columns left over: one p_n each, summed by vector.reduction

Results are rounded once to bf16/f16, as torch's CPU matmul accumulates them in f32.  The
axpy walks contiguous rows of w[e], which LLVM vectorises.  The dot products are written in
the vector dialect: a chunk of x, loaded once, multiplies `lanes` weight rows, and one
transpose-and-add tree of shuffles turns the `lanes` vectors of partial sums into the vector of
their sums (log2(lanes) levels), instead of a reduction per column (a loop per column that
LLVM vectorises with its own reduction: 56 µs where this takes 39, for an MoE layer's 512
tokens × [32 → 64] f32).  bf16 chunks are read as 32-bit words of two elements each (see
_bf16_pairs_as_f32).  The adds reassociate, as a BLAS's blocked sums do.  w[e] stays in cache
across the tokens routed to expert e.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flagtree.backends.cpu import scalar_ops
from flagtree.backends.cpu.emitter import EmittedKernel
from flagtree.backends.cpu.host import host_cpu
from flagtree.backends.cpu.mlir_text import FunctionWriter, compute_type, is_narrow_float, memref_type, storage_type
from flagtree.ir.core import Operation
from flagtree.ir.types import ScalarType, TensorType


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
        self.transpose_w = op.attributes.get("transpose_w", False)
        self.x_repeat = op.attributes.get("x_repeat", 1)
        self.names = ("%x", "%w", "%index", "%out")
        self.lanes = host_cpu().vector_bits // ScalarType(self.compute).bitwidth
        self.vector = f"vector<{self.lanes}x{self.compute}>"
        # Elements of k one step of a dot product loads: a vector's worth (two for bf16, see _chunk_load).
        self.chunk = self.lanes * (2 if self.storage == "bf16" else 1)

    def emit(self) -> EmittedKernel:
        types: list[TensorType] = [*(v.type for v in self.op.operands), self.op.results[0].type]
        self.memrefs = [memref_type(t.shape, storage_type(t.dtype)) for t in types]
        params = [f"{ssa}: {memref}" for ssa, memref in zip(self.names, self.memrefs)]
        params += ["%lo: index", "%hi: index"]
        experts, rows = self._dim(1, 0), self._dim(0, 1)
        self.depth = self._dim(0, 2)
        self.cols = self._dim(1, 1 if self.transpose_w else 2)
        # On the stack: LLVM then knows it aliases no operand and vectorises the loops over it (the aligned
        # heap buffer memref.alloc makes hides that behind pointer arithmetic: 2.5x slower, measured).
        acc_size = self.w.index(self.lanes) if self.transpose_w else self.cols
        self.acc = self.w.emit(f"memref.alloca({acc_size}) {{alignment = 64 : i64}} : {self.acc_type}", "acc")
        if self.transpose_w:
            self.zeros = self.w.emit(f"vector.broadcast {self.w.constant(0.0, self.compute)} : {self.compute} to "
                                     f"{self.vector}")
            self.stored_zeros = self.w.emit(f"vector.broadcast {self.w.constant(0.0, self.storage)} : {self.storage} "
                                            f"to vector<{self.chunk}x{self.storage}>")
        with self.w.loop("%lo", "%hi") as b:
            expert = self._expert(self._load(2, [b]), experts)
            x_entry = self._x_entry(b)
            with self.w.loop(0, rows) as m:
                if self.transpose_w:
                    self._row_of_dots(b, m, x_entry, expert)
                else:
                    self._row_of_axpys(b, m, x_entry, expert)
        self.w.line("return")
        text = (f"  func.func @{self.name}({', '.join(params)}) attributes {{llvm.emit_c_interface}} {{\n"
                + "\n".join(self.w.body()) + "\n  }\n")
        return EmittedKernel(self.name, text, frozenset(self.w.helpers))

    @property
    def acc_type(self) -> str:
        return f"memref<?x{self.compute}>"

    def _row_of_axpys(self, b: str, m: str, x_entry: str, expert: str) -> None:
        """out[b, m, :] = x[x_entry, m, :] @ w[expert] (w [E, K, N]), accumulated in `acc`."""
        with self.w.loop(0, self.cols) as n:
            self.w.line(f"memref.store {self.w.constant(0.0, self.compute)}, {self.acc}[{n}] : {self.acc_type}")
        with self.w.loop(0, self.depth) as k:
            scale = self._widen(self._load(0, [x_entry, m, k]))
            with self.w.loop(0, self.cols) as n:
                weight = self._widen(self._load(1, [expert, k, n]))
                total = self.w.emit(f"memref.load {self.acc}[{n}] : {self.acc_type}")
                updated = self.w.emit(f"math.fma {scale}, {weight}, {total} : {self.compute}")
                self.w.line(f"memref.store {updated}, {self.acc}[{n}] : {self.acc_type}")
        with self.w.loop(0, self.cols) as n:
            total = self.w.emit(f"memref.load {self.acc}[{n}] : {self.acc_type}")
            self._store_out(total, b, m, n)

    def _row_of_dots(self, b: str, m: str, x_entry: str, expert: str) -> None:
        """out[b, m, :] = x[x_entry, m, :] @ w[expert]ᵀ (w [E, N, K]): `lanes` columns at a time, their
        dot products' vectors of partial sums added across lanes into one vector of sums, then the
        columns left over one by one."""
        w = self.w
        blocked = self._round_down(self.cols, self.lanes)
        with w.loop(0, blocked, self.lanes) as n:
            columns = [n] + [w.emit(f"arith.addi {n}, {w.index(i)} : index") for i in range(1, self.lanes)]
            sums = self._sums_across(self._dot_partials(x_entry, m, expert, columns))
            if self.narrow_float:
                w.line(f"vector.store {sums}, {self.acc}[{w.index(0)}] : {self.acc_type}, {self.vector}")
                with w.loop(0, self.lanes) as lane:
                    total = w.emit(f"memref.load {self.acc}[{lane}] : {self.acc_type}")
                    self._store_out(total, b, m, w.emit(f"arith.addi {n}, {lane} : index"))
            else:
                w.line(f"vector.store {sums}, {self.names[3]}[{b}, {m}, {n}] : {self.memrefs[3]}, {self.vector}")
        with w.loop(blocked, self.cols) as n:
            (partials,) = self._dot_partials(x_entry, m, expert, [n])
            total = w.emit(f"vector.reduction <add>, {partials} fastmath<reassoc> : {self.vector} into {self.compute}")
            self._store_out(total, b, m, n)

    def _dot_partials(self, x_entry: str, m: str, expert: str, columns: list[str]) -> list[str]:
        """Per column n, a vector whose lanes sum to Σ_k x[x_entry, m, k] · w[expert, n, k]: one
        scf.for over whole chunks of k carrying them, then the k left over under a mask."""
        w = self.w
        whole = self._round_down(self.depth, self.chunk)
        k, result = w.fresh("k"), w.fresh("partials")
        carried = [w.fresh("acc") for _ in columns]
        types = ", ".join([self.vector] * len(columns))
        w.line(f"{result}:{len(columns)} = scf.for {k} = {w.index(0)} to {whole} step {w.index(self.chunk)} "
               f"iter_args({', '.join(f'{a} = {self.zeros}' for a in carried)}) -> ({types}) {{")
        w.depth += 1
        w.line(f"scf.yield {', '.join(self._fma_step(x_entry, m, expert, columns, k, carried, None))} : {types}")
        w.depth -= 1
        w.line("}")
        partials = [f"{result}#{i}" for i in range(len(columns))]
        depth = self.op.operands[0].type.shape[2]
        if depth is not None and depth % self.chunk == 0:
            return partials
        left = w.emit(f"arith.subi {self.depth}, {whole} : index")
        mask = w.emit(f"vector.create_mask {left} : vector<{self.chunk}xi1>")
        return self._fma_step(x_entry, m, expert, columns, whole, partials, mask)

    def _fma_step(self, x_entry: str, m: str, expert: str, columns: list[str], k: str, partials: list[str],
                  mask: str | None) -> list[str]:
        """`partials` plus x[x_entry, m, k:k+chunk] · w[expert, n, k:k+chunk] per column n (the
        elements `mask` keeps, when given)."""
        xs = self._chunk_load(0, [x_entry, m, k], mask)
        updated = []
        for n, total in zip(columns, partials):
            for x, weight in zip(xs, self._chunk_load(1, [expert, n, k], mask)):
                total = self.w.emit(f"vector.fma {x}, {weight}, {total} : {self.vector}")
            updated.append(total)
        return updated

    def _sums_across(self, partials: list[str]) -> str:
        """The vector whose lane i is the sum of partials[i]'s lanes (one vector per lane): pairs
        of vectors fold their halves into one, log2(lanes) times (a transpose and add tree)."""
        vectors, width = partials, self.lanes
        while len(vectors) > 1:
            folded = []
            for first, second in zip(vectors[::2], vectors[1::2]):
                low, high = [], []
                for offset in (0, self.lanes):  # shufflevector numbers the second vector's lanes after the first's
                    for start in range(0, self.lanes, width):
                        low += range(offset + start, offset + start + width // 2)
                        high += range(offset + start + width // 2, offset + start + width)
                halves = [self.w.emit(f"vector.shuffle {first}, {second} [{', '.join(map(str, lanes))}] : "
                                      f"{self.vector}, {self.vector}") for lanes in (low, high)]
                folded.append(self.w.emit(f"arith.addf {halves[0]}, {halves[1]} : {self.vector}"))
            vectors, width = folded, width // 2
        return vectors[0]

    def _chunk_load(self, operand: int, indices: list[str], mask: str | None) -> list[str]:
        """`chunk` consecutive elements along the last dim from `indices` (masked-off ones read as 0)
        as vectors of the compute type: one, or for bf16 two (its even and odd elements; a dot
        product may pair them in any order)."""
        memref, place = self.memrefs[operand], f"{self.names[operand]}[{', '.join(indices)}]"
        stored = f"vector<{self.chunk}x{self.storage}>"
        if mask is None:
            loaded = self.w.emit(f"vector.load {place} : {memref}, {stored}")
        else:
            loaded = self.w.emit(f"vector.maskedload {place}, {mask}, {self.stored_zeros} : {memref}, "
                                 f"vector<{self.chunk}xi1>, {stored} into {stored}")
        if self.storage == "bf16":
            return self._bf16_pairs_as_f32(loaded)
        if self.narrow_float:
            return [self.w.emit(f"arith.extf {loaded} : {stored} to {self.vector}")]
        return [loaded]

    def _bf16_pairs_as_f32(self, pairs: str) -> list[str]:
        """A vector of 2·lanes bf16 as two f32 vectors, its even and odd elements.  A bf16 is the high
        half of the f32 it widens to, so each 32-bit word holding an (even, odd) pair gives the even
        one shifted up and the odd one with its low half cleared: no lane crosses, no shuffles."""
        words_type = f"vector<{self.lanes}xi32>"
        words = self.w.emit(f"vector.bitcast {pairs} : vector<{self.chunk}xbf16> to {words_type}")
        sixteen = self.w.emit(f"vector.broadcast {self.w.constant(16, 'i32')} : i32 to {words_type}")
        high_half = self.w.emit(f"vector.broadcast {self.w.constant(-0x10000, 'i32')} : i32 to {words_type}")
        even = self.w.emit(f"arith.shli {words}, {sixteen} : {words_type}")
        odd = self.w.emit(f"arith.andi {words}, {high_half} : {words_type}")
        return [self.w.emit(f"arith.bitcast {bits} : {words_type} to {self.vector}") for bits in (even, odd)]

    def _store_out(self, total: str, b: str, m: str, n: str) -> None:
        self.w.line(f"memref.store {self._narrow(total)}, {self.names[3]}[{b}, {m}, {n}] : {self.memrefs[3]}")

    def _round_down(self, size: str, multiple: int) -> str:
        """`size` rounded down to a multiple of `multiple` (an index)."""
        left_over = self.w.emit(f"arith.remui {size}, {self.w.index(multiple)} : index")
        return self.w.emit(f"arith.subi {size}, {left_over} : index")

    def _x_entry(self, b: str) -> str:
        """The entry of x that batch entry b reads: b // x_repeat."""
        if self.x_repeat == 1:
            return b
        return self.w.emit(f"arith.divui {b}, {self.w.index(self.x_repeat)} : index")

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
