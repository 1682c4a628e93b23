"""The cpu kernel of one `ft.attention` op: a tiled online softmax in MLIR (scf, vector, memref).

Semantics are flagtree/ir/ops/attention.py's.  The kernel splits its work into items, one
per (batch, KV head, block of BLOCK_ROWS query rows); the rows of a KV head are its query
heads' rows one after another (row ρ is query head `hk·group + ρ // Sq`, query `ρ % Sq`), so
GQA/MQA read each K/V element once per block however many query heads share it, and a
decode step (Sq = 1) still fills a block with the group's heads.  The kernel computes the
items in `[lo, hi)`; the wrapper (kernel.py) gives each core a range.  Items are numbered so
that any contiguous range mixes early and late query blocks (zigzag), which balances causal
work between cores.

Per item, in the compute type (f32; f64 for f64 inputs), with the block's rows as vector
lanes (a row vector is `vector<BLOCK_ROWS x f32>`, a few machine registers):

    Qᵀ[d, :] = q[rows, d]·scale                           (a gather per d; padded rows are 0)
    m[r] = sink or -inf,  l[r] = 1 or 0,  Accᵀ[d, r] = 0
    for each key block [j0, j0 + cols) inside the block's visible key range:
        Sᵀ[c, :] = Σ_d k[j0 + c, d] · Qᵀ[d, :]            (register-blocked rank-1 updates)
        Sᵀ += mask / Sᵀ = -inf where hidden                (mask operand, causal, window)
        m' = max(m, max_c Sᵀ[c, :]);  m̃ = m' or 0 where m' = -inf (a row that saw no key)
        α = exp(m - m̃);  Pᵀ = exp(Sᵀ - m̃);  l = l·α + Σ_c Pᵀ[c, :];  m = m'
        Accᵀ[d, :] = α·Accᵀ[d, :] + Σ_c v[j0 + c, d] · Pᵀ[c, :]
    out[row r, d] = Accᵀ[d, r] / l[r], or 0 where l[r] = 0 (never NaN)

Causal and window attention limit each block's key range (blocks wholly above the diagonal
or left of the window are never visited); the per-element visibility test runs only in key
blocks that cross the diagonal or the window's edge.  Both products are rank-1 updates of
OUTPUTS_PER_STEP row vectors held in registers (`scf.for` iter_args), reading one row vector
and broadcasting one scalar of K or V per update: the K/V tiles are never copied or
transposed.  The softmax passes work on row vectors too, m, l and α carried in registers
across key blocks; their exp is a short polynomial for the non-positive arguments a softmax
has (f32; math.exp in f64).

q, k, v, mask and sinks are read with their own strides (kernel.Strides), so the permuted
views a plan passes after its projections cost no copy, and the output is written in
[B, S, H, D] order, so the permute and reshape that usually follow it are views.  A call is
split across cores when its flops (not its operands' size) pay for the hand-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from flagtree.backends.cpu import scalar_ops
from flagtree.backends.cpu.emitter import EmittedKernel
from flagtree.backends.cpu.host import host_cpu
from flagtree.backends.cpu.kernel import KernelCallError, Strides, WorkItems, WorthSplitting
from flagtree.backends.cpu.mlir_text import FunctionWriter, compute_type, memref_type, storage_type
from flagtree.ir.core import Operation
from flagtree.ir.types import ScalarType, TensorType

_NARROW_FLOATS = frozenset({"f16", "bf16"})
_OUTPUT_ORDER = (0, 2, 1, 3)  # the output's memory order: [B, S, H, D]
# Below this many flops a call runs on one core: handing half the items to a pool thread and
# joining it costs ~70 µs right after a BLAS matmul (whose threads still spin), while the kernel
# computes 40-80 flops a nanosecond.  Measured on 2 cores (Zen 4), one core → two, each call after
# a 256x64x64 matmul: 4.2 Mflop 80-115 → 105-125 µs, 8.4 Mflop 166-214 → 151-178, 16.8 Mflop
# 233-306 → 184-224, 33.6 Mflop 519 → 331.
PARALLEL_MIN_FLOPS = 1 << 23


@dataclass(frozen=True)
class AttentionTiles:
    """Block sizes: BLOCK_ROWS query rows (the vector lanes) × BLOCK_KEYS keys per step of the
    online softmax; each product step updates OUTPUTS_PER_STEP row vectors."""

    block_rows: int
    block_keys: int
    outputs_per_step: int

    @staticmethod
    def for_op(op: Operation) -> AttentionTiles:
        """Row vectors of two registers, or fewer when the op has fewer rows per KV head (a decode
        step: Sq = 1), and one for a short causal f32 sequence: there most of a block's wasted work
        is the part of its diagonal key tile above the diagonal, which grows with the block, while
        narrow types widen every K/V element they broadcast, which longer rows amortise (measured
        on AVX-512 (Zen 4), one to two to four registers: causal f32 Sq = 64, D = 16 58/63/75 µs,
        Sq = 256 515/536/572; Sq = 512, D = 64 3774/3300/3567, non-causal 6303/5671/5776; bf16
        Sq = 64 72/65/76, Sq = 512 4472/3232/3286).  As many row vectors in flight as the
        register file holds with room for the operand (32 vector registers on AVX-512 and NEON,
        16 on AVX2)."""
        q, k = op.operands[0].type, op.operands[1].type
        cpu = host_cpu()
        lanes = cpu.vector_bits // ScalarType(compute_type(q.dtype)).bitwidth
        short_causal = op.attributes["causal"] != "none" and q.shape[2] is not None and q.shape[2] <= 256
        registers_per_row = 1 if short_causal and q.dtype.name == "f32" else 2
        if None not in (q.shape[1], q.shape[2], k.shape[1]):
            rows_per_kv_head = q.shape[1] // k.shape[1] * q.shape[2]
            registers_per_row = max(1, min(registers_per_row, -(-rows_per_kv_head // lanes)))
        outputs_per_step = 2 if cpu.isa in ("avx2", "avx", "sse2") else 4
        return AttentionTiles(lanes * registers_per_row, block_keys=64, outputs_per_step=outputs_per_step)


def emit_attention(op: Operation, name: str) -> EmittedKernel:
    """The MLIR function computing one ft.attention op.  It takes q, k, v, [mask], [sinks]
    (memrefs), the output memref, then the range `%lo, %hi` of work items (see work_items)."""
    return _AttentionEmitter(op, name).emit()


def strides(op: Operation) -> Strides:
    """Every input is read with its own strides (q, k and v usually arrive as permuted views of
    [B, S, H, D] projections), and the output is written in [B, S, H, D] order, which its consumer's
    permute and reshape then view (eager torch's flash kernel lays its output out the same way)."""
    return Strides(frozenset(range(len(op.operands))), {0: _OUTPUT_ORDER})


def worth_splitting(op: Operation) -> WorthSplitting:
    """Whether a call of `op`'s kernel computes PARALLEL_MIN_FLOPS or more (2·(Dqk + Dv) per
    visible query-key pair and query head): its work grows with the product of the lengths, not
    with its operands."""
    causal, window = op.attributes["causal"], op.attributes["window"]

    def enough(args: Sequence[Any], _shapes: list[tuple[int, ...]]) -> bool:
        q, k, v = args[:3]
        batch, query_heads, queries, qk_dim = q.shape
        pairs = visible_pairs(queries, k.shape[2], causal, window)
        return 2 * batch * query_heads * pairs * (qk_dim + v.shape[3]) >= PARALLEL_MIN_FLOPS

    return enough


def visible_pairs(queries: int, keys: int, causal: str, window: int) -> int:
    """How many (query, key) pairs are visible under `causal` and `window` (ir/ops/attention.py's
    visible_keys, counted per row: keys (last - window, last] within [0, keys))."""
    if causal == "none":
        return queries * keys
    ends = torch.arange(1, queries + 1) + (keys - queries if causal == "lower_right" else 0)
    starts = (ends - window).clamp(0, keys) if window else 0
    return int((ends.clamp(0, keys) - starts).sum())


def work_items(op: Operation) -> WorkItems:
    """How many work items a call of `op`'s kernel has, from its arguments (the q and k tensors)."""
    rows = AttentionTiles.for_op(op).block_rows

    def count(args: Sequence[Any], _shapes: list[tuple[int, ...]]) -> int:
        q, k = args[0], args[1]
        batch, query_heads, queries = q.shape[0], q.shape[1], q.shape[2]
        if (query_heads - 1) * q.stride(1) + (queries - 1) * q.stride(2) >= 2**31:
            raise KernelCallError(f"attention kernel: q {list(q.shape)} with strides {list(q.stride())} spans 2^31 "
                                  "elements or more per batch, past the kernel's 32-bit row offsets; split the batch")
        kv_heads = k.shape[1]
        return batch * kv_heads * -(-(query_heads // kv_heads * queries) // rows)

    return count


class _AttentionEmitter:
    def __init__(self, op: Operation, name: str):
        self.op = op
        self.name = name
        self.w = FunctionWriter()
        self.attrs = op.attributes
        q_type: TensorType = op.operands[0].type
        self.storage = storage_type(q_type.dtype)
        self.compute = compute_type(q_type.dtype)
        self.tiles = AttentionTiles.for_op(op)
        self.rows = self.tiles.block_rows
        self.row_vector = f"vector<{self.rows}x{self.compute}>"
        self.params: list[str] = []

    # ------------------------------------------------------------------ structure
    def emit(self) -> EmittedKernel:
        operands = [self._parameter(f"%arg{i}", v.type) for i, v in enumerate(self.op.operands)]
        self.q, self.k, self.v = operands[:3]
        self.mask = operands[3] if self.attrs["has_mask"] else None
        self.sinks = operands[-1] if self.attrs["has_sinks"] else None
        self.out = self._parameter("%out0", self.op.results[0].type)
        self.lse = self._parameter("%out1", self.op.results[1].type, strided=False) if len(self.op.results) > 1 \
            else None
        self.params += ["%lo: index", "%hi: index"]
        self._sizes()
        self._buffers()
        with self.w.loop("%lo", "%hi") as item:
            self._item(item)
        self.w.line("return")
        text = (f"  func.func @{self.name}({', '.join(self.params)}) attributes {{llvm.emit_c_interface}} {{\n"
                + "\n".join(self.w.body()) + "\n  }\n")
        return EmittedKernel(self.name, text, frozenset(self.w.helpers))

    def _parameter(self, name: str, t: TensorType, strided: bool = True) -> _Memref:
        memref = _Memref(name, t.shape, storage_type(t.dtype), strided)
        self.params.append(f"{name}: {memref.type}")
        return memref

    def _sizes(self) -> None:
        """The problem's sizes (`index` values), and the derived counts every item uses."""
        self.query_heads, self.queries, self.qk_dim = (self._dim(self.q, i) for i in (1, 2, 3))
        self.kv_heads, self.keys = self._dim(self.k, 1), self._dim(self.k, 2)
        self.v_dim = self._dim(self.v, 3)
        self.group = self._index("divui", self.query_heads, self.kv_heads)
        self.rows_per_kv_head = self._index("muli", self.group, self.queries)
        self.blocks = self._index("ceildivui", self.rows_per_kv_head, self.rows)
        step = self.tiles.outputs_per_step
        self.v_dim_padded = self._index("muli", self._index("ceildivui", self.v_dim, step), step)
        causal = self.attrs["causal"]
        self.offset = self._index("subi", self.keys, self.queries) if causal == "lower_right" else self.w.index(0)

    def _buffers(self) -> None:
        """Per-call scratch (heap: a long head dim would not fit a thread's stack)."""
        rows, keys, c = self.rows, self.tiles.block_keys, self.compute
        self.q_t = self._alloc("q_t", f"memref<?x{rows}x{c}>", self.qk_dim)
        self.s_t = self._alloc("s_t", f"memref<{keys}x{rows}x{c}>")
        self.acc_t = self._alloc("acc_t", f"memref<?x{rows}x{c}>", self.v_dim_padded)
        self.m, self.l = (self._alloc(name, f"memref<{rows}x{c}>") for name in ("m", "l"))
        self.head, self.query = (self._alloc(name, self._lane_index_type) for name in ("head", "query"))
        self.q_offsets = self._alloc("q_offsets", f"memref<{rows}xi32>")
        causal = self.attrs["causal"] != "none"
        self.diagonal_buffer = self._alloc("diagonal", f"memref<{rows}xi32>") if causal else None
        self.zero_vector = self._splat(self._float(0.0))
        self.minus_inf_vector = self._splat(self._float(-math.inf))

    def _alloc(self, name: str, memref_text: str, *dynamic: str) -> str:
        return self.w.emit(f"memref.alloc({', '.join(dynamic)}) {{alignment = 64 : i64}} : {memref_text}", name)

    # ------------------------------------------------------------------ one work item
    def _item(self, item: str) -> None:
        """One (batch, KV head, row block): set up its rows, walk its key range, write its rows."""
        pair = self._index("divui", item, self.blocks)
        block = self._zigzag(self._index("remui", item, self.blocks))
        self.b = self._index("divui", pair, self.kv_heads)
        self.kv_head = self._index("remui", pair, self.kv_heads)
        self.first_row = self._index("muli", block, self.rows)
        self.row_count = self._index("minsi", self.w.index(self.rows),
                                     self._index("subi", self.rows_per_kv_head, self.first_row))
        self._load_rows()
        query_range = self._query_range() if self.attrs["causal"] != "none" else None
        first_key, end_key = self._key_range(query_range)
        diagonal_from, window_until = self._masked_key_blocks(query_range)
        self._load_diagonal()
        starts = [self._row_load(buffer, None, None) for buffer in (self.m, self.l)]
        with self._carrying(first_key, end_key, self.tiles.block_keys, starts) as key_blocks:
            j0, (m, weights) = key_blocks.iv, key_blocks.values
            cols = self._index("minsi", self.w.index(self.tiles.block_keys), self._index("subi", end_key, j0))
            self._scores(j0, cols)
            if self.mask is not None:
                self._apply_mask(j0, cols)
            m_next = self._block_max(j0, cols, m, diagonal_from, window_until)
            shift, alpha = self._rescale(m, m_next)
            total = self._probabilities(cols, shift)
            self._accumulate_values(j0, cols, alpha)
            key_blocks.updates = [m_next, self.w.emit(f"vector.fma {weights}, {alpha}, {total} : {self.row_vector}")]
        for value, buffer in zip(key_blocks.results, (self.m, self.l)):
            self.w.line(f"vector.store {value}, {buffer}[{self.w.index(0)}] : {self._state_type}, {self.row_vector}")
        self._store_rows()

    def _zigzag(self, position: str) -> str:
        """Block 0, last, 1, last - 1, ...: any run of consecutive positions mixes short and long
        causal rows, so contiguous per-core ranges get equal work."""
        half = self._index("divui", position, self.w.index(2))
        odd = self.w.emit(f"arith.cmpi ne, {self._index('andi', position, self.w.index(1))}, {self.w.index(0)} : index")
        from_end = self._index("subi", self._index("subi", self.blocks, self.w.index(1)), half)
        return self.w.emit(f"arith.select {odd}, {from_end}, {half} : index")

    def _load_rows(self) -> None:
        """Each row's head and query index, its softmax state and its scaled query in Qᵀ's lane;
        lanes past the block's last row get head and query 0 and a zero query, so every lane the
        vectorised passes read is defined.  Accᵀ starts at 0."""
        w = self.w
        with self.w.loop(0, self.rows) as r:
            w.line(f"memref.store {self._float(-math.inf)}, {self.m}[{r}] : {self._state_type}")
            w.line(f"memref.store {self._float(0.0)}, {self.l}[{r}] : {self._state_type}")
            for buffer in (self.head, self.query):
                w.line(f"memref.store {w.index(0)}, {buffer}[{r}] : {self._lane_index_type}")
            w.line(f"memref.store {w.constant(0, 'i32')}, {self.q_offsets}[{r}] : memref<{self.rows}xi32>")
            if self.diagonal_buffer is not None:
                self._store_diagonal(r, w.index(0))
        q_strides = self._strides(self.q)
        with self.w.loop(0, self.row_count) as r:
            row = self._index("addi", self.first_row, r)
            head = self._index("addi", self._index("muli", self.kv_head, self.group),
                               self._index("divui", row, self.queries))
            query = self._index("remui", row, self.queries)
            w.line(f"memref.store {head}, {self.head}[{r}] : {self._lane_index_type}")
            w.line(f"memref.store {query}, {self.query}[{r}] : {self._lane_index_type}")
            offset = self._index("addi", self._index("muli", head, q_strides[1]),
                                 self._index("muli", query, q_strides[2]))
            w.line(f"memref.store {w.emit(f'arith.index_cast {offset} : index to i32')}, {self.q_offsets}[{r}] : "
                   f"memref<{self.rows}xi32>")
            if self.diagonal_buffer is not None:
                self._store_diagonal(r, query)
            if self.sinks is not None:
                self._start_from_sink(r, head)
        self._gather_queries()
        with self.w.loop(0, self.v_dim_padded) as d:
            w.line(f"vector.store {self.zero_vector}, {self.acc_t}[{d}, {w.index(0)}] : "
                   f"memref<?x{self.rows}x{self.compute}>, {self.row_vector}")

    def _gather_queries(self) -> None:
        """Qᵀ[d, :] = the rows' q[.., d]·scale: a gather at the rows' offsets per d (storing q's rows
        into Qᵀ's columns would scatter, which is slower on x86), 0 in lanes past the last row."""
        w, storage = self.w, self.q.element
        storage_vector = f"vector<{self.rows}x{storage}>"
        lanes = w.emit(f"vector.create_mask {self.row_count} : {self._mask_vector}")
        offsets = w.emit(f"vector.load {self.q_offsets}[{w.index(0)}] : memref<{self.rows}xi32>, {self._lane_vector}")
        nothing = w.emit(f"vector.broadcast {w.constant(0.0, storage)} : {storage} to {storage_vector}")
        scale = self._splat(self._float(self.attrs["scale"]))
        with self.w.loop(0, self.qk_dim) as d:
            row = w.emit(f"vector.gather {self.q.ssa}[{self.b}, {w.index(0)}, {w.index(0)}, {d}][{offsets}], {lanes}, "
                         f"{nothing} : {self.q.type}, {self._lane_vector}, {self._mask_vector}, {storage_vector} "
                         f"into {storage_vector}")
            scaled = w.emit(f"arith.mulf {self._widen_vector(row, storage)}, {scale} : {self.row_vector}")
            self._row_store(scaled, self.q_t, d, "?")

    def _widen_vector(self, x: str, element: str) -> str:
        """A row vector of `element`s in the compute type (bf16 by a shift, as scalar_ops.widen)."""
        if element == self.compute:
            return x
        if element == "bf16":
            halves, words = f"vector<{self.rows}xi16>", self._lane_vector
            bits = self.w.emit(f"arith.extui {self.w.emit(f'arith.bitcast {x} : vector<{self.rows}xbf16> to {halves}')}"
                               f" : {halves} to {words}")
            shifted = self.w.emit(f"arith.shli {bits}, {self._splat_i32(16)} : {words}")
            return self.w.emit(f"arith.bitcast {shifted} : {words} to {self.row_vector}")
        return self.w.emit(f"arith.extf {x} : vector<{self.rows}x{element}> to {self.row_vector}")

    def _strides(self, memref: _Memref) -> list[str]:
        """The strides (`index` values) of a strided operand."""
        w, rank = self.w, len(memref.shape)
        metadata = w.fresh("meta")
        w.line(f"{metadata}:{2 + 2 * rank} = memref.extract_strided_metadata {memref.ssa} : {memref.type} -> "
               f"memref<{memref.element}>, {', '.join(['index'] * (1 + 2 * rank))}")
        return [f"{metadata}#{2 + rank + i}" for i in range(rank)]

    def _store_diagonal(self, r: str, query: str) -> None:
        """The last key lane r sees (query + offset), as i32 for the vectorised visibility test."""
        diagonal = self.w.emit(f"arith.index_cast {self._index('addi', query, self.offset)} : index to i32")
        self.w.line(f"memref.store {diagonal}, {self.diagonal_buffer}[{r}] : memref<{self.rows}xi32>")

    def _load_diagonal(self) -> None:
        """The item's per-lane diagonal (and window edge: the last key a lane no longer sees) as vectors."""
        if self.diagonal_buffer is None:
            return
        w = self.w
        self.diagonal = w.emit(f"vector.load {self.diagonal_buffer}[{w.index(0)}] : memref<{self.rows}xi32>, "
                               f"{self._lane_vector}")
        if self.attrs["window"]:
            width = w.emit(f"vector.broadcast {w.constant(self.attrs['window'], 'i32')} : i32 to {self._lane_vector}")
            self.window_edge = w.emit(f"arith.subi {self.diagonal}, {width} : {self._lane_vector}")

    def _start_from_sink(self, r: str, head: str) -> None:
        """m = the sink logit, l = exp(sink - m) = 1; a -inf sink adds nothing: l = 0 (so a row
        that sees no key keeps l = 0, which its output and lse read as "saw nothing")."""
        w, c = self.w, self.compute
        sink = self._load(self.sinks, [head])
        adds_nothing = w.emit(f"arith.cmpf oeq, {sink}, {self._float(-math.inf)} : {c}")
        weight = w.emit(f"arith.select {adds_nothing}, {self._float(0.0)}, {self._float(1.0)} : {c}")
        w.line(f"memref.store {sink}, {self.m}[{r}] : {self._state_type}")
        w.line(f"memref.store {weight}, {self.l}[{r}] : {self._state_type}")

    def _query_range(self) -> tuple[str, str]:
        """The smallest and largest query index among the block's rows: their own when the
        rows belong to one head, else every query (the block wraps to the next head)."""
        last_row = self._index("subi", self._index("addi", self.first_row, self.row_count), self.w.index(1))
        first_head = self._index("divui", self.first_row, self.queries)
        one_head = self.w.emit(f"arith.cmpi eq, {first_head}, {self._index('divui', last_row, self.queries)} : index")
        lowest = self.w.emit(f"arith.select {one_head}, {self._index('remui', self.first_row, self.queries)}, "
                             f"{self.w.index(0)} : index")
        last_query = self._index("subi", self.queries, self.w.index(1))
        highest = self.w.emit(f"arith.select {one_head}, {self._index('remui', last_row, self.queries)}, "
                              f"{last_query} : index")
        return lowest, highest

    def _key_range(self, query_range: tuple[str, str] | None) -> tuple[str, str]:
        """[first, end) of the keys any row of the block sees: blocks of keys outside it are
        skipped (above the causal diagonal, before the window)."""
        if query_range is None:
            return self.w.index(0), self.keys
        lowest, highest = query_range
        end = self._index("minsi", self.keys, self._index("addi", self._index("addi", highest, self.offset),
                                                          self.w.index(1)))
        first = self.w.index(0)
        if self.attrs["window"]:
            earliest = self._index("subi", self._index("addi", lowest, self.offset),
                                   self.w.index(self.attrs["window"] - 1))
            first = self._index("maxsi", first, earliest)
        return first, self._index("maxsi", end, first)

    def _masked_key_blocks(self, query_range: tuple[str, str] | None) -> tuple[str | None, str | None]:
        """Key blocks ending past `diagonal_from` cross the causal diagonal of some row, and
        those starting before `window_until` cross some row's window edge; only those test
        each score's visibility."""
        if query_range is None:
            return None, None
        lowest, highest = query_range
        diagonal_from = self._index("addi", self._index("addi", lowest, self.offset), self.w.index(1))
        window_until = None
        if self.attrs["window"]:
            window_until = self._index("subi", self._index("addi", highest, self.offset),
                                       self.w.index(self.attrs["window"] - 1))
        return diagonal_from, window_until

    # ------------------------------------------------------------------ one key block
    def _scores(self, j0: str, cols: str) -> None:
        """Sᵀ[c, :] = Σ_d k[j0 + c, d]·Qᵀ[d, :] for the block's keys, OUTPUTS_PER_STEP keys at a
        time (the last step's extra keys repeat the last key; their scores are never read)."""
        step = self.tiles.outputs_per_step
        last_key = self._index("subi", self.keys, self.w.index(1))
        with self.w.loop(0, self._index("muli", self._index("ceildivui", cols, step), step), step) as c0:
            keys = [self._index("minsi", self._index("addi", j0, self._index("addi", c0, self.w.index(i))), last_key)
                    for i in range(step)]
            scores = self._rank_one_updates(
                0, self.qk_dim, [self.zero_vector] * step,
                lambda d: self._row_load(self.q_t, d, "?"),
                lambda d, i: self._load(self.k, [self.b, self.kv_head, keys[i], d]))
            for i, score in enumerate(scores):
                self._row_store(score, self.s_t, self._index("addi", c0, self.w.index(i)), self.tiles.block_keys)

    def _apply_mask(self, j0: str, cols: str) -> None:
        """The mask operand: a false i1 hides the score, a float is added to it."""
        w, c = self.w, self.compute
        mask_type: TensorType = self.op.operands[3].type
        with self.w.loop(0, self.row_count) as r:
            head = w.emit(f"memref.load {self.head}[{r}] : {self._lane_index_type}")
            query = w.emit(f"memref.load {self.query}[{r}] : {self._lane_index_type}")
            with self.w.loop(0, cols) as col:
                key = self._index("addi", j0, col)
                indices = [self._broadcast_index(self.mask, i, x) for i, x in enumerate((self.b, head, query, key))]
                score = w.emit(f"memref.load {self.s_t}[{col}, {r}] : {self._s_t_type}")
                if mask_type.dtype.name == "i1":
                    keep = w.emit(f"memref.load {self.mask.ssa}[{', '.join(indices)}] : {self.mask.type}")
                    masked = w.emit(f"arith.select {keep}, {score}, {self._float(-math.inf)} : {c}")
                else:
                    masked = w.emit(f"arith.addf {score}, {self._load(self.mask, indices)} : {c}")
                w.line(f"memref.store {masked}, {self.s_t}[{col}, {r}] : {self._s_t_type}")

    def _broadcast_index(self, memref: _Memref, dim: int, index: str) -> str:
        """Where `index` reads along a broadcastable dim: 0 in a size-1 dim.  A dynamic dim is
        1 or full size (the shapes were checked when the call's output shape was inferred),
        so clamping to its last index covers both."""
        size = memref.shape[dim]
        if size == 1:
            return self.w.index(0)
        if size is not None:
            return index
        return self._index("minui", index, self._index("subi", self._dim(memref, dim), self.w.index(1)))

    def _block_max(self, j0: str, cols: str, m: str, diagonal_from: str | None, window_until: str | None) -> str:
        """m' = max(m, the block's scores); in blocks crossing the diagonal or a window edge,
        scores of keys a row does not see become -inf first."""
        if diagonal_from is None:
            return self._max_pass(j0, cols, m, hide=False)
        w = self.w
        end = self._index("addi", j0, cols)
        crosses = w.emit(f"arith.cmpi sgt, {end}, {diagonal_from} : index")
        if window_until is not None:
            before_window = w.emit(f"arith.cmpi slt, {j0}, {window_until} : index")
            crosses = w.emit(f"arith.ori {crosses}, {before_window} : i1")
        result = w.fresh("max")
        w.line(f"{result} = scf.if {crosses} -> ({self.row_vector}) {{")
        for hide in (True, False):
            w.depth += 1
            w.line(f"scf.yield {self._max_pass(j0, cols, m, hide)} : {self.row_vector}")
            w.depth -= 1
            w.line("} else {" if hide else "}")
        return result

    def _max_pass(self, j0: str, cols: str, m: str, hide: bool) -> str:
        """The running max over the block's scores, a row vector per key (a NaN score leaves it as
        it is: the NaN reaches the output through its weight)."""
        w = self.w
        with self._carrying(0, cols, 1, [m]) as loop:
            score = self._row_load(self.s_t, loop.iv, self.tiles.block_keys)
            if hide:
                visible = self._visible(self._index("addi", j0, loop.iv))
                score = w.emit(f"arith.select {visible}, {score}, {self.minus_inf_vector} : "
                               f"{self._mask_vector}, {self.row_vector}")
                self._row_store(score, self.s_t, loop.iv, self.tiles.block_keys)
            larger = w.emit(f"arith.cmpf ogt, {score}, {loop.values[0]} : {self.row_vector}")
            loop.updates = [w.emit(f"arith.select {larger}, {score}, {loop.values[0]} : "
                                   f"{self._mask_vector}, {self.row_vector}")]
        return loop.results[0]

    def _visible(self, key: str) -> str:
        """Which rows see `key`: key ≤ query + offset (and query + offset - key < window)."""
        w = self.w
        key = w.emit(f"arith.index_cast {key} : index to i32")
        keys = w.emit(f"vector.broadcast {key} : i32 to {self._lane_vector}")
        visible = w.emit(f"arith.cmpi sle, {keys}, {self.diagonal} : {self._lane_vector}")
        if self.attrs["window"]:
            inside = w.emit(f"arith.cmpi sgt, {keys}, {self.window_edge} : {self._lane_vector}")
            visible = w.emit(f"arith.andi {visible}, {inside} : {self._mask_vector}")
        return visible

    def _rescale(self, m: str, m_next: str) -> tuple[str, str]:
        """m̃ = m' or 0 where m' = -inf (a row that has seen nothing visible, so -inf - -inf never
        happens), the shift of this block's exps; and α = exp(m - m̃)."""
        w, vector = self.w, self.row_vector
        nothing = w.emit(f"arith.cmpf oeq, {m_next}, {self.minus_inf_vector} : {vector}")
        shift = w.emit(f"arith.select {nothing}, {self.zero_vector}, {m_next} : {self._mask_vector}, {vector}")
        return shift, self._exp(w.emit(f"arith.subf {m}, {shift} : {vector}"))

    def _probabilities(self, cols: str, shift: str) -> str:
        """Pᵀ = exp(Sᵀ - m̃) in place of Sᵀ; returns Σ_c Pᵀ[c, :]."""
        w = self.w
        with self._carrying(0, cols, 1, [self.zero_vector]) as loop:
            score = self._row_load(self.s_t, loop.iv, self.tiles.block_keys)
            p = self._exp(w.emit(f"arith.subf {score}, {shift} : {self.row_vector}"))
            self._row_store(p, self.s_t, loop.iv, self.tiles.block_keys)
            loop.updates = [w.emit(f"arith.addf {loop.values[0]}, {p} : {self.row_vector}")]
        return loop.results[0]

    def _accumulate_values(self, j0: str, cols: str, alpha: str) -> None:
        """Accᵀ[d, :] = α·Accᵀ[d, :] + Σ_c v[j0 + c, d]·Pᵀ[c, :], OUTPUTS_PER_STEP dims at a time
        (the last step's extra dims repeat the last dim into Accᵀ's padding rows)."""
        step = self.tiles.outputs_per_step
        last_dim = self._index("subi", self.v_dim, self.w.index(1))
        with self.w.loop(0, self.v_dim_padded, step) as d0:
            dims = [self._index("addi", d0, self.w.index(i)) for i in range(step)]
            clamped = [self._index("minsi", d, last_dim) for d in dims]
            starts = [self.w.emit(f"arith.mulf {self._row_load(self.acc_t, d, '?')}, {alpha} : {self.row_vector}")
                      for d in dims]
            sums = self._rank_one_updates(
                0, cols, starts,
                lambda col: self._row_load(self.s_t, col, self.tiles.block_keys),
                lambda col, i: self._load(self.v, [self.b, self.kv_head, self._index("addi", j0, col), clamped[i]]))
            for d, total in zip(dims, sums):
                self._row_store(total, self.acc_t, d, "?")

    def _store_rows(self) -> None:
        """out[row r, d] = Accᵀ[d, r] / l[r]; 0 for a row whose weights sum to 0 (it saw nothing)."""
        w, c = self.w, self.compute
        with self.w.loop(0, self.row_count) as r:
            head = w.emit(f"memref.load {self.head}[{r}] : {self._lane_index_type}")
            query = w.emit(f"memref.load {self.query}[{r}] : {self._lane_index_type}")
            total = self._row_state(self.l, r)
            seen = w.emit(f"arith.cmpf ogt, {total}, {self._float(0.0)} : {c}")
            inverse = w.emit(f"arith.divf {self._float(1.0)}, {total} : {c}")
            factor = w.emit(f"arith.select {seen}, {inverse}, {self._float(0.0)} : {c}")
            if self.lse is not None:
                self._store_lse(r, head, query, seen, total)
            with self.w.loop(0, self.v_dim) as d:
                value = w.emit(f"memref.load {self.acc_t}[{d}, {r}] : memref<?x{self.rows}x{c}>")
                result = self._narrow(w.emit(f"arith.mulf {value}, {factor} : {c}"))
                w.line(f"memref.store {result}, {self.out.ssa}[{self.b}, {head}, {query}, {d}] : {self.out.type}")

    def _store_lse(self, r: str, head: str, query: str, seen: str, total: str) -> None:
        """lse[row r] = m[r] + log(l[r]); +inf for a row whose weights sum to 0."""
        w, c = self.w, self.compute
        dtype = ScalarType(c)
        safe_total = w.emit(f"arith.select {seen}, {total}, {self._float(1.0)} : {c}")
        log_total = scalar_ops.lower(w, "ft.log", [(safe_total, dtype)], dtype, {})
        lse = w.emit(f"arith.addf {self._row_state(self.m, r)}, {log_total} : {c}")
        value = w.emit(f"arith.select {seen}, {lse}, {self._float(math.inf)} : {c}")
        w.line(f"memref.store {value}, {self.lse.ssa}[{self.b}, {head}, {query}] : {self.lse.type}")

    # ------------------------------------------------------------------ building blocks
    def _rank_one_updates(self, lower: int | str, upper: str, starts: list[str], row: Callable[[str], str],
                          scalar: Callable[[str, int], str]) -> list[str]:
        """For x in [lower, upper): out_i += scalar(x, i) · row(x), the out_i row vectors
        carried in registers (one scf.for with iter_args)."""
        w = self.w
        with self._carrying(lower, upper, 1, starts) as loop:
            vector = row(loop.iv)
            updated = []
            for i, accumulator in enumerate(loop.values):
                factor = w.emit(f"vector.broadcast {scalar(loop.iv, i)} : {self.compute} to {self.row_vector}")
                updated.append(w.emit(f"vector.fma {factor}, {vector}, {accumulator} : {self.row_vector}"))
            loop.updates = updated
        return loop.results

    @contextmanager
    def _carrying(self, lower: int | str, upper: str, step: int, starts: list[str]) -> Iterator[_CarriedLoop]:
        """An scf.for over [lower, upper) carrying row vectors from `starts` (iter_args): the body
        reads `loop.iv` and `loop.values` and sets `loop.updates`; after it, `loop.results` are the
        values after the last iteration."""
        w = self.w
        loop = _CarriedLoop(w.fresh("x"), [w.fresh("acc") for _ in starts], w.fresh("carried"), len(starts))
        types = ", ".join([self.row_vector] * len(starts))
        w.line(f"{loop.name}:{len(starts)} = scf.for {loop.iv} = {self._as_index(lower)} to {upper} step "
               f"{w.index(step)} iter_args({', '.join(f'{a} = {s}' for a, s in zip(loop.values, starts))}) "
               f"-> ({types}) {{")
        w.depth += 1
        yield loop
        w.line(f"scf.yield {', '.join(loop.updates)} : {types}")
        w.depth -= 1
        w.line("}")

    def _row_load(self, buffer: str, index: str | None, leading: int | str | None) -> str:
        """Row `index` of a [leading, BLOCK_ROWS] buffer (of a [BLOCK_ROWS] one when index is None)."""
        indices, memref = self._row_address(buffer, index, leading)
        return self.w.emit(f"vector.load {buffer}[{indices}] : {memref}, {self.row_vector}")

    def _row_store(self, value: str, buffer: str, index: str, leading: int | str) -> None:
        indices, memref = self._row_address(buffer, index, leading)
        self.w.line(f"vector.store {value}, {buffer}[{indices}] : {memref}, {self.row_vector}")

    def _row_address(self, buffer: str, index: str | None, leading: int | str | None) -> tuple[str, str]:
        if index is None:
            return self.w.index(0), self._state_type
        return f"{index}, {self.w.index(0)}", f"memref<{leading}x{self.rows}x{self.compute}>"

    def _row_state(self, buffer: str, r: str) -> str:
        return self.w.emit(f"memref.load {buffer}[{r}] : {self._state_type}")

    @property
    def _state_type(self) -> str:
        return f"memref<{self.rows}x{self.compute}>"

    @property
    def _lane_vector(self) -> str:
        return f"vector<{self.rows}xi32>"

    @property
    def _mask_vector(self) -> str:
        return f"vector<{self.rows}xi1>"

    def _splat(self, scalar: str) -> str:
        return self.w.emit(f"vector.broadcast {scalar} : {self.compute} to {self.row_vector}")

    @property
    def _lane_index_type(self) -> str:
        return f"memref<{self.rows}xindex>"

    @property
    def _s_t_type(self) -> str:
        return f"memref<{self.tiles.block_keys}x{self.rows}x{self.compute}>"

    def _load(self, memref: _Memref, indices: list[str]) -> str:
        """An element of an operand, in the compute type."""
        x = self.w.emit(f"memref.load {memref.ssa}[{', '.join(indices)}] : {memref.type}")
        return self._to_compute(x, memref.element)

    def _to_compute(self, x: str, element: str) -> str:
        if element == self.compute:
            return x
        if element in _NARROW_FLOATS:
            x = scalar_ops.widen(self.w, x, element)
            element = "f32"
        if element == self.compute:
            return x
        direction = "extf" if element == "f32" else "truncf"  # f32 → f64, or an f64 mask/sink → f32
        return self.w.emit(f"arith.{direction} {x} : {element} to {self.compute}")

    def _narrow(self, x: str) -> str:
        return scalar_ops.narrow(self.w, x, self.storage) if self.storage in _NARROW_FLOATS else x

    def _exp(self, x: str) -> str:
        """exp of a row vector whose lanes are ≤ 0, -inf or NaN (a softmax's shifted scores).  In f32
        a short form of approx.py's: no overflow handling, n = round(x·log2 e) by the 1.5·2^23
        trick (its bits give 2^n without a float-to-int conversion), a degree-5 polynomial (≤ 3 ulp
        on [-87.3, 0]), 0 below the smallest normal result; NaN stays NaN."""
        w, vector = self.w, self.row_vector
        if self.compute != "f32":
            return w.emit(f"math.exp {x} : {vector}")
        bits = f"vector<{self.rows}xi32>"
        t = w.emit(f"arith.mulf {x}, {self._splat(self._float(math.log2(math.e)))} : {vector}")
        shifted = w.emit(f"arith.addf {t}, {self._splat(self._float(_ROUNDING_SHIFT))} : {vector}")
        n = w.emit(f"arith.subf {shifted}, {self._splat(self._float(_ROUNDING_SHIFT))} : {vector}")
        r = x
        for part in _LN2_PARTS:
            r = w.emit(f"vector.fma {n}, {self._splat(self._float(-part))}, {r} : {vector}")
        p = self._splat(self._float(_EXP_POLYNOMIAL[0]))
        for coefficient in _EXP_POLYNOMIAL[1:]:
            p = w.emit(f"vector.fma {p}, {r}, {self._splat(self._float(coefficient))} : {vector}")
        exponent = w.emit(f"arith.shli {w.emit(f'arith.bitcast {shifted} : {vector} to {bits}')}, "
                          f"{self._splat_i32(23)} : {bits}")
        biased = w.emit(f"arith.addi {exponent}, {self._splat_i32(_EXPONENT_BIAS)} : {bits}")
        y = w.emit(f"arith.mulf {p}, {w.emit(f'arith.bitcast {biased} : {bits} to {vector}')} : {vector}")
        underflow = w.emit(f"arith.cmpf olt, {x}, {self._splat(self._float(_EXP_UNDERFLOW))} : {vector}")
        return w.emit(f"arith.select {underflow}, {self.zero_vector}, {y} : {self._mask_vector}, {vector}")

    def _splat_i32(self, value: int) -> str:
        return self.w.emit(f"vector.broadcast {self.w.constant(value, 'i32')} : i32 to {self._lane_vector}")

    def _float(self, value: float) -> str:
        return self.w.constant(value, self.compute)

    def _dim(self, memref: _Memref, dim: int) -> str:
        size = memref.shape[dim]
        if size is not None:
            return self.w.index(size)
        return self.w.emit(f"memref.dim {memref.ssa}, {self.w.index(dim)} : {memref.type}", "d")

    def _index(self, operation: str, a: int | str, b: int | str) -> str:
        """`arith.<operation>` on two index values (ints are constants)."""
        return self.w.emit(f"arith.{operation} {self._as_index(a)}, {self._as_index(b)} : index")

    def _as_index(self, value: int | str) -> str:
        return self.w.index(value) if isinstance(value, int) else value



# exp(x) = 2^n · exp(r), n = round(x / ln 2), r = x - n·ln 2 (ln 2 in two parts: Cephes').  n is
# rounded by adding 1.5·2^23: the sum's bits are 0x4B400000 + n, so shifting them into the exponent
# field (the constant's own bits shift out) and adding the bias 127 << 23 gives 2^n's.
_ROUNDING_SHIFT = 1.5 * 2.0**23
_EXPONENT_BIAS = 127 << 23
_LN2_PARTS = (0.693359375, -2.12194440e-4)
# exp(r) on |r| ≤ ln(2)/2, highest power first: a relative-minimax fit (1.0e-7).
_EXP_POLYNOMIAL = (8.312526158988476e-3, 4.1890114545822144e-2, 0.16667114198207855, 0.499992311000824, 1.0, 1.0)
_EXP_UNDERFLOW = -87.33654  # ln of the smallest normal f32: below, exp is 0


@dataclass
class _CarriedLoop:
    """An scf.for carrying values (see _AttentionEmitter._carrying)."""

    iv: str
    values: list[str]
    name: str
    count: int
    updates: list[str] = field(default_factory=list)

    @property
    def results(self) -> list[str]:
        return [f"{self.name}#{i}" for i in range(self.count)]


@dataclass(frozen=True)
class _Memref:
    """A kernel parameter: its SSA name, FTIR shape and element type."""

    ssa: str
    shape: tuple[int | None, ...]
    element: str
    strided: bool  # strides from the call (kernel.Strides), the innermost 1

    @property
    def type(self) -> str:
        contiguous = memref_type(self.shape, self.element)
        if not self.strided:
            return contiguous
        return f"{contiguous[:-1]}, strided<[{'?, ' * (len(self.shape) - 1)}1]>>"
