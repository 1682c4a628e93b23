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

    Qᵀ[d, r] = q[row r, d]·scale                          (once per item; padded rows are 0)
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
transposed.  The elementwise softmax passes are scalar loops over the lanes, which LLVM
vectorises (exp is approx.py's inlined polynomial).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flagtree.backends.cpu import scalar_ops
from flagtree.backends.cpu.emitter import EmittedKernel
from flagtree.backends.cpu.host import host_cpu
from flagtree.backends.cpu.kernel import WorkItems
from flagtree.backends.cpu.mlir_text import FunctionWriter, compute_type, memref_type, storage_type
from flagtree.ir.core import Operation
from flagtree.ir.types import ScalarType, TensorType

_NARROW_FLOATS = frozenset({"f16", "bf16"})


@dataclass(frozen=True)
class AttentionTiles:
    """Block sizes: BLOCK_ROWS query rows (the vector lanes) × BLOCK_KEYS keys per step of the
    online softmax; each product step updates OUTPUTS_PER_STEP row vectors."""

    block_rows: int
    block_keys: int
    outputs_per_step: int

    @staticmethod
    def for_op(op: Operation) -> AttentionTiles:
        """Row vectors of four registers, or fewer when the op has fewer rows per KV head (a
        decode step: Sq = 1), and two for a short causal sequence (at most two such blocks of
        queries): there a block of a whole head's queries spends most of its key steps above the
        diagonal, which smaller blocks skip (measured on AVX-512: 64 queries 14% faster, 128 5%,
        256 4% slower).  As many row vectors in flight as the register file holds with room for
        the operand (32 vector registers on AVX-512 and NEON, 16 on AVX2)."""
        q, k = op.operands[0].type, op.operands[1].type
        cpu = host_cpu()
        lanes = cpu.vector_bits // ScalarType(compute_type(q.dtype)).bitwidth
        registers_per_row = 4
        if op.attributes["causal"] != "none" and q.shape[2] is not None and q.shape[2] <= 2 * lanes * registers_per_row:
            registers_per_row = 2
        if None not in (q.shape[1], q.shape[2], k.shape[1]):
            rows_per_kv_head = q.shape[1] // k.shape[1] * q.shape[2]
            registers_per_row = max(1, min(registers_per_row, -(-rows_per_kv_head // lanes)))
        outputs_per_step = 2 if cpu.isa in ("avx2", "avx", "sse2") else 4
        return AttentionTiles(lanes * registers_per_row, block_keys=64, outputs_per_step=outputs_per_step)


def emit_attention(op: Operation, name: str) -> EmittedKernel:
    """The MLIR function computing one ft.attention op.  It takes q, k, v, [mask], [sinks]
    (memrefs), the output memref, then the range `%lo, %hi` of work items (see work_items)."""
    return _AttentionEmitter(op, name).emit()


def work_items(op: Operation) -> WorkItems:
    """How many work items a call of `op`'s kernel has, from its arguments (the q and k tensors)."""
    rows = AttentionTiles.for_op(op).block_rows

    def count(args: Sequence[Any], _shapes: list[tuple[int, ...]]) -> int:
        q, k = args[0], args[1]
        batch, query_heads, queries = q.shape[0], q.shape[1], q.shape[2]
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
        self.lse = self._parameter("%out1", self.op.results[1].type) if len(self.op.results) > 1 else None
        self.params += ["%lo: index", "%hi: index"]
        self._sizes()
        self._buffers()
        with self.w.loop("%lo", "%hi") as item:
            self._item(item)
        self.w.line("return")
        text = (f"  func.func @{self.name}({', '.join(self.params)}) attributes {{llvm.emit_c_interface}} {{\n"
                + "\n".join(self.w.body()) + "\n  }\n")
        return EmittedKernel(self.name, text, frozenset(self.w.helpers))

    def _parameter(self, name: str, t: TensorType) -> _Memref:
        memref = _Memref(name, t.shape, storage_type(t.dtype))
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
        self.m, self.m_next, self.l, self.alpha = (self._alloc(name, f"memref<{rows}x{c}>")
                                                   for name in ("m", "m_next", "l", "alpha"))
        self.head, self.query = (self._alloc(name, self._lane_index_type) for name in ("head", "query"))
        self.zero_vector = self.w.emit(f"vector.broadcast {self._float(0.0)} : {c} to {self.row_vector}")

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
        with self.w.loop(first_key, end_key, self.tiles.block_keys) as j0:
            cols = self._index("minsi", self.w.index(self.tiles.block_keys), self._index("subi", end_key, j0))
            self._scores(j0, cols)
            if self.mask is not None:
                self._apply_mask(j0, cols)
            self._running_max(j0, cols, diagonal_from, window_until)
            self._rescale()
            self._probabilities(cols)
            self._accumulate_values(j0, cols)
        self._store_rows()

    def _zigzag(self, position: str) -> str:
        """Block 0, last, 1, last - 1, ...: any run of consecutive positions mixes short and long
        causal rows, so contiguous per-core ranges get equal work."""
        half = self._index("divui", position, self.w.index(2))
        odd = self.w.emit(f"arith.cmpi ne, {self._index('andi', position, self.w.index(1))}, {self.w.index(0)} : index")
        from_end = self._index("subi", self._index("subi", self.blocks, self.w.index(1)), half)
        return self.w.emit(f"arith.select {odd}, {from_end}, {half} : index")

    def _load_rows(self) -> None:
        """Each row's head and query index, its softmax state, its scaled query in Qᵀ's lane,
        and zero lanes past the block's last row (head and query 0 there, so every lane the
        vectorised passes read is defined); Accᵀ starts at 0."""
        w, c = self.w, self.compute
        with self.w.loop(0, self.rows) as r:
            w.line(f"memref.store {self._float(-math.inf)}, {self.m}[{r}] : {self._state_type}")
            w.line(f"memref.store {self._float(0.0)}, {self.l}[{r}] : {self._state_type}")
            for buffer in (self.head, self.query):
                w.line(f"memref.store {w.index(0)}, {buffer}[{r}] : {self._lane_index_type}")
        with self.w.loop(0, self.row_count) as r:
            row = self._index("addi", self.first_row, r)
            head = self._index("addi", self._index("muli", self.kv_head, self.group),
                               self._index("divui", row, self.queries))
            query = self._index("remui", row, self.queries)
            w.line(f"memref.store {head}, {self.head}[{r}] : {self._lane_index_type}")
            w.line(f"memref.store {query}, {self.query}[{r}] : {self._lane_index_type}")
            if self.sinks is not None:
                self._start_from_sink(r, head)
            scale = self._float(self.attrs["scale"])
            with self.w.loop(0, self.qk_dim) as d:
                x = self._load(self.q, [self.b, head, query, d])
                w.line(f"memref.store {w.emit(f'arith.mulf {x}, {scale} : {c}')}, {self.q_t}[{d}, {r}] : "
                       f"memref<?x{self.rows}x{c}>")
        with self.w.loop(self.row_count, self.rows) as r, self.w.loop(0, self.qk_dim) as d:
            w.line(f"memref.store {self._float(0.0)}, {self.q_t}[{d}, {r}] : memref<?x{self.rows}x{c}>")
        with self.w.loop(0, self.v_dim_padded) as d:
            w.line(f"vector.store {self.zero_vector}, {self.acc_t}[{d}, {w.index(0)}] : "
                   f"memref<?x{self.rows}x{c}>, {self.row_vector}")

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

    def _running_max(self, j0: str, cols: str, diagonal_from: str | None, window_until: str | None) -> None:
        """m' = max(m, the block's scores); in blocks crossing the diagonal or a window edge,
        scores of keys a row does not see become -inf first."""
        w = self.w
        with self.w.loop(0, self.rows) as r:
            w.line(f"memref.store {self._row_state(self.m, r)}, {self.m_next}[{r}] : {self._state_type}")
        if diagonal_from is None:
            self._max_pass(j0, cols, hide=False)
            return
        end = self._index("addi", j0, cols)
        crosses = w.emit(f"arith.cmpi sgt, {end}, {diagonal_from} : index")
        if window_until is not None:
            before_window = w.emit(f"arith.cmpi slt, {j0}, {window_until} : index")
            crosses = w.emit(f"arith.ori {crosses}, {before_window} : i1")
        w.line(f"scf.if {crosses} {{")
        w.depth += 1
        self._max_pass(j0, cols, hide=True)
        w.depth -= 1
        w.line("} else {")
        w.depth += 1
        self._max_pass(j0, cols, hide=False)
        w.depth -= 1
        w.line("}")

    def _max_pass(self, j0: str, cols: str, hide: bool) -> None:
        w, c = self.w, self.compute
        with self.w.loop(0, cols) as col:
            key = self._index("addi", j0, col) if hide else None
            with self.w.loop(0, self.rows) as r:
                score = w.emit(f"memref.load {self.s_t}[{col}, {r}] : {self._s_t_type}")
                if hide:
                    score = w.emit(f"arith.select {self._visible(key, r)}, {score}, {self._float(-math.inf)} : {c}")
                    w.line(f"memref.store {score}, {self.s_t}[{col}, {r}] : {self._s_t_type}")
                larger = w.emit(f"arith.maximumf {self._row_state(self.m_next, r)}, {score} : {c}")
                w.line(f"memref.store {larger}, {self.m_next}[{r}] : {self._state_type}")

    def _visible(self, key: str, r: str) -> str:
        """Whether row r sees `key`: key ≤ query + offset (and query + offset - key < window)."""
        w = self.w
        query = w.emit(f"memref.load {self.query}[{r}] : {self._lane_index_type}")
        diagonal = self._index("addi", query, self.offset)
        visible = w.emit(f"arith.cmpi sle, {key}, {diagonal} : index")
        if self.attrs["window"]:
            distance = self._index("subi", diagonal, key)
            inside = w.emit(f"arith.cmpi slt, {distance}, {w.index(self.attrs['window'])} : index")
            visible = w.emit(f"arith.andi {visible}, {inside} : i1")
        return visible

    def _rescale(self) -> None:
        """α = exp(m - m̃), l ·= α, m = m'; m_next keeps m̃, the shift of this block's exps
        (0 while a row has seen nothing visible, so -inf - -inf never happens)."""
        w, c = self.w, self.compute
        with self.w.loop(0, self.rows) as r:
            old = self._row_state(self.m, r)
            new = self._row_state(self.m_next, r)
            nothing = w.emit(f"arith.cmpf oeq, {new}, {self._float(-math.inf)} : {c}")
            shift = w.emit(f"arith.select {nothing}, {self._float(0.0)}, {new} : {c}")
            alpha = self._exp(w.emit(f"arith.subf {old}, {shift} : {c}"))
            scaled = w.emit(f"arith.mulf {self._row_state(self.l, r)}, {alpha} : {c}")
            for value, buffer in ((alpha, self.alpha), (scaled, self.l), (new, self.m), (shift, self.m_next)):
                w.line(f"memref.store {value}, {buffer}[{r}] : {self._state_type}")

    def _probabilities(self, cols: str) -> None:
        """Pᵀ = exp(Sᵀ - m̃) in place of Sᵀ, and l += Σ_c Pᵀ[c, :]."""
        w, c = self.w, self.compute
        with self.w.loop(0, cols) as col, self.w.loop(0, self.rows) as r:
            score = w.emit(f"memref.load {self.s_t}[{col}, {r}] : {self._s_t_type}")
            p = self._exp(w.emit(f"arith.subf {score}, {self._row_state(self.m_next, r)} : {c}"))
            w.line(f"memref.store {p}, {self.s_t}[{col}, {r}] : {self._s_t_type}")
            total = w.emit(f"arith.addf {self._row_state(self.l, r)}, {p} : {c}")
            w.line(f"memref.store {total}, {self.l}[{r}] : {self._state_type}")

    def _accumulate_values(self, j0: str, cols: str) -> None:
        """Accᵀ[d, :] = α·Accᵀ[d, :] + Σ_c v[j0 + c, d]·Pᵀ[c, :], OUTPUTS_PER_STEP dims at a time
        (the last step's extra dims repeat the last dim into Accᵀ's padding rows)."""
        step = self.tiles.outputs_per_step
        last_dim = self._index("subi", self.v_dim, self.w.index(1))
        alpha = self._row_load(self.alpha, None, None)
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
        x, result = w.fresh("x"), w.fresh("sum")
        carried = [w.fresh("acc") for _ in starts]
        types = ", ".join([self.row_vector] * len(starts))
        w.line(f"{result}:{len(starts)} = scf.for {x} = {self._as_index(lower)} to {upper} step {w.index(1)} "
               f"iter_args({', '.join(f'{a} = {s}' for a, s in zip(carried, starts))}) -> ({types}) {{")
        w.depth += 1
        vector = row(x)
        updated = []
        for i, accumulator in enumerate(carried):
            factor = w.emit(f"vector.broadcast {scalar(x, i)} : {self.compute} to {self.row_vector}")
            updated.append(w.emit(f"vector.fma {factor}, {vector}, {accumulator} : {self.row_vector}"))
        w.line(f"scf.yield {', '.join(updated)} : {types}")
        w.depth -= 1
        w.line("}")
        return [f"{result}#{i}" for i in range(len(starts))]

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
        dtype = ScalarType(self.compute)
        return scalar_ops.lower(self.w, "ft.exp", [(x, dtype)], dtype, {})

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



@dataclass(frozen=True)
class _Memref:
    """A kernel parameter: its SSA name, FTIR shape and element type."""

    ssa: str
    shape: tuple[int | None, ...]
    element: str

    @property
    def type(self) -> str:
        return memref_type(self.shape, self.element)
