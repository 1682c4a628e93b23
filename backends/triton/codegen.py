"""Generate one Triton kernel for one `ft.fusion` region.

The kernel is the source of a small Python module: a comment with the region's FTIR,
`LAUNCH` (how the launch plan calls the kernel: its size arguments, outputs, grid and
constexprs, see backends/triton/launch.py), and one undecorated function that the
backend wraps with `triton.jit` (or Triton's interpreter).

Code is generated backwards from each yielded value: `value(v, index)` returns the
Triton expression of `v` at a symbolic index (one expression per dim of `v`).  View ops
(reshape, transpose, broadcast_to, slice) only rewrite the index, so they cost no data
movement; loads take every input's strides as kernel arguments, so inputs may be
non-contiguous.  Expressions are memoised per (value, index), so a value used twice at
the same index is loaded or computed once.

Two kernel shapes:
- elementwise: a flat index over the iteration shape (the broadcast of the yielded
  shapes), BLOCK elements per program;
- row reduction: the iteration shape is the reductions' input shape; kept dims are
  "rows" (ROWS per program), reduced dims are flattened into one row of length R,
  processed in one block (persistent, when R fits) or in a loop of RBLOCK steps.
  Reductions that depend on other reductions (softmax: the max, then the sum of
  exp(x - max)) run in successive passes over the row; values downstream of a reduction
  and outputs are computed after it.  Floating accumulators are f32 (f64 for f64); a
  bf16/f16 sum, mean or softmax is rounded to its type once, at the end, as torch does.

Every index variable and expression records the kernel axes it varies along ("x": the
flat index or the rows, "r": the row block), which decides masks and lets row-level
values be computed outside the reduction loop.
"""

from __future__ import annotations

import itertools
import pprint
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flagtree.backends.base import Capabilities
from flagtree.backends.lowering import UnsupportedRegion
from flagtree.backends.triton.ops import (
    NAN_ALL,
    Operand,
    cast,
    cast_is_free,
    compute_type,
    emit_elementwise,
    fold_constants,
    highest,
    is_narrow,
    literal,
    lowest,
    rounded,
    storage_type,
)
from flagtree.backends.triton.shapes import (
    REDUCTIONS,
    ROW_NORMALIZERS,
    VIEWS,
    Dim,
    RegionShapes,
    Shape,
    assumption,
    broadcast,
    reduced_dims,
)
from flagtree.backends.triton.tiling import elementwise_tiling, reduction_tiling
from flagtree.ir.attributes import DenseAttr
from flagtree.ir.core import BlockArgument, Operation, Value
from flagtree.ir.opdef import REDUCTION, has_trait
from flagtree.ir.printer import print_op
from flagtree.ir.types import I1, I64, ScalarType, TensorType

X = frozenset({"x"})
R = frozenset({"r"})
XR = X | R
NONE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Index:
    """One dimension of a symbolic index: Triton source and the axes it varies along."""

    expr: str
    axes: frozenset[str]


ZERO = Index("0", NONE)


@dataclass(frozen=True)
class Emitted:
    """A value in the kernel: its source text (a name or a literal), FTIR element type,
    the axes it varies along, and its value when known at compile time."""

    text: str
    dtype: ScalarType
    axes: frozenset[str]
    constant: Any = None


@dataclass
class KernelSource:
    """A generated kernel: its function name, module source, and launch description."""

    name: str
    source: str
    launch: dict[str, Any]


def generate_kernel(fusion: Operation, caps: Capabilities) -> KernelSource:
    """The Triton kernel of `fusion`; raises UnsupportedRegion naming the op it cannot generate."""
    block = fusion.regions[0].block
    reducing = any(op.name in REDUCTIONS | ROW_NORMALIZERS or has_trait(op, REDUCTION) for op in block.ops)
    kernel = _ReductionKernel(fusion, caps) if reducing else _ElementwiseKernel(fusion, caps)
    return kernel.generate()


def _union(indices: Sequence[Index | Emitted]) -> frozenset[str]:
    return frozenset().union(*(i.axes for i in indices)) if indices else NONE


def _aligned(shape: Shape, target: Shape, target_index: Sequence[Index]) -> tuple[Index, ...]:
    """The index of a value of `shape` broadcast (right-aligned) into `target`."""
    offset = len(target) - len(shape)
    return tuple(ZERO if d == 1 else target_index[offset + j] for j, d in enumerate(shape))


class _Kernel:
    """What both kernel shapes share: scopes, names, value emission, loads and stores."""

    def __init__(self, fusion: Operation, caps: Capabilities):
        self.fusion = fusion
        self.caps = caps
        self.block = fusion.regions[0].block
        self.yields = list(self.block.terminator.operands)
        self.shapes = RegionShapes(fusion)
        self.size_params: dict[str, str] = {}
        self.top: list[str] = []
        self.loop_header: str | None = None
        self.loop: list[str] | None = None
        self.memo: dict[tuple[int, tuple[str, ...]], Emitted] = {}
        self.index_memo: dict[str, Index] = {}
        self.counter = itertools.count()
        self.axes = NONE  # axes of the op being emitted; `tmp` places its lines by them
        self.narrowest_bytes = 8

    # --- source text ------------------------------------------------------------------

    def size(self, d: Dim) -> str:
        """Kernel source for a dimension: a literal, or the size argument carrying it."""
        if isinstance(d, int):
            return str(d)
        if d not in self.size_params:
            self.size_params[d] = f"size{len(self.size_params)}"
        return self.size_params[d]

    def product(self, dims: Sequence[Dim]) -> str:
        static = 1
        names = []
        for d in dims:
            if isinstance(d, int):
                static *= d
            else:
                names.append(self.size(d))
        return " * ".join(([str(static)] if static != 1 or not names else []) + names)

    def divisor(self, dims: Sequence[Dim]) -> str:
        text = self.product(dims)
        return f"({text})" if " " in text else text

    def line(self, text: str, axes: frozenset[str]) -> None:
        """Emit a statement: inside the open loop if it varies along the row block, else
        at the top of the kernel (where values computed in a loop body stay visible)."""
        if "r" in axes and self.loop is not None:
            self.loop.append(text)
        else:
            self.top.append(text)

    def tmp(self, expr: str) -> str:
        name = f"t{next(self.counter)}"
        self.line(f"{name} = {expr}", self.axes)
        return name

    def index_var(self, expr: str, axes: frozenset[str]) -> Index:
        if expr in self.index_memo:
            return self.index_memo[expr]
        index = Index(f"i{next(self.counter)}", axes)
        self.line(f"{index.expr} = {expr}", axes)
        self.index_memo[expr] = index
        return index

    def open_loop(self, header: str) -> None:
        self.loop_header, self.loop = header, []

    def close_loop(self) -> None:
        self.top.append(self.loop_header)
        self.top.extend("    " + line for line in self.loop)
        self.loop_header, self.loop = None, None
        # Names defined in the loop body are dead after it.
        self.memo = {k: v for k, v in self.memo.items() if "r" not in v.axes}
        self.index_memo = {k: v for k, v in self.index_memo.items() if "r" not in v.axes}

    def delinearize(self, flat: str, dims: Sequence[Dim], axes: frozenset[str],
                    names: Sequence[str] | None = None) -> list[Index]:
        """Split a row-major flat index over `dims` into one index per dim."""
        out = [ZERO] * len(dims)
        live = [j for j, d in enumerate(dims) if d != 1]
        for n, j in enumerate(live):
            inner = [dims[k] for k in live[n + 1:]]
            expr = f"{flat} // {self.divisor(inner)}" if inner else flat
            if n > 0:
                expr = f"{expr} % {self.size(dims[j])}"
            if names is None:
                out[j] = self.index_var(expr, axes)
            else:
                self.line(f"{names[j]} = {expr}", axes)
                out[j] = Index(names[j], axes)
        return out

    def linear(self, index: Sequence[Index], dims: Sequence[Dim]) -> Index:
        """The row-major position of `index` in a contiguous tensor of shape `dims`."""
        terms = []
        for j, i in enumerate(index):
            if i.expr == "0":
                continue
            inner = [d for d in dims[j + 1:] if d != 1]
            terms.append(f"{i.expr} * {self.divisor(inner)}" if inner else i.expr)
        if not terms:
            return ZERO
        if len(terms) == 1 and " " not in terms[0]:
            return next(i for i in index if i.expr != "0")
        return self.index_var(" + ".join(terms), _union(index))

    # --- values -----------------------------------------------------------------------

    def value(self, v: Value, index: tuple[Index, ...]) -> Emitted:
        """`v` at `index`, computed once per (value, index)."""
        key = (id(v), tuple(i.expr for i in index))
        if key not in self.memo:
            self.memo[key] = self._compute(v, index)
        return self.memo[key]

    def _compute(self, v: Value, index: tuple[Index, ...]) -> Emitted:
        if isinstance(v, BlockArgument):
            return self._argument(v, index)
        op = v.op
        if op.name in VIEWS:
            return self.value(op.operands[0], self._view_index(op, index))
        if op.name == "ft.constant":
            return self._constant(op)
        if op.name in REDUCTIONS | ROW_NORMALIZERS:
            return self.reduced_value(op, index)
        if has_trait(op, REDUCTION):
            raise UnsupportedRegion(f"reduction '{op.name}' has no Triton lowering yet")
        return self._elementwise(op, index)

    def reduced_value(self, op: Operation, index: tuple[Index, ...]) -> Emitted:
        raise UnsupportedRegion(f"'{op.name}' in an elementwise kernel")

    def _argument(self, arg: BlockArgument, index: tuple[Index, ...]) -> Emitted:
        name = f"in{arg.index}"
        if not isinstance(arg.type, TensorType):
            return Emitted(name, arg.type, NONE)
        dtype = arg.type.dtype
        storage_type(dtype)  # rejects element types Triton lacks
        self.narrowest_bytes = min(self.narrowest_bytes, max(1, dtype.bitwidth // 8))
        offset = " + ".join(f"{i.expr} * {name}_stride{d}" for d, i in enumerate(index) if i.expr != "0") or "0"
        axes = _union(index)
        mask = self.mask(axes)
        text = f"tl.load({name} + {offset}{f', mask={mask}' if mask else ''})"
        if is_narrow(dtype):
            text += ".to(tl.float32)"
        self.axes = axes
        return Emitted(self.tmp(text), dtype, axes)

    def _constant(self, op: Operation) -> Emitted:
        value = op.attributes["value"]
        dtype = op.results[0].type.dtype if isinstance(op.results[0].type, TensorType) else op.results[0].type
        if isinstance(value, DenseAttr):
            flat = value.value.reshape(-1)
            if flat.numel() == 0 or not bool((flat == flat[0]).all() | (flat != flat).all()):
                raise UnsupportedRegion("a dense constant that is not a splat; pass it as an operand")
            value = flat[0].item()
        elif not isinstance(value, (int, float, bool)):
            raise UnsupportedRegion(f"constant {value!r} cannot be a kernel literal")
        return Emitted(literal(value, dtype), dtype, NONE, value)

    def _elementwise(self, op: Operation, index: tuple[Index, ...]) -> Emitted:
        result = op.results[0]
        shape = self.shapes.of(result)
        operands = [self.value(o, _aligned(self.shapes.of(o), shape, index)) for o in op.operands]
        dtype = result.type.dtype if isinstance(result.type, TensorType) else result.type
        if all(o.constant is not None for o in operands):
            value = fold_constants([Operand(o.text, o.dtype, o.constant) for o in operands], op)
            return Emitted(literal(value, dtype), dtype, NONE, value)
        self.axes = _union(operands)
        views = [Operand(o.text, o.dtype, o.constant) for o in operands]
        text = cast(self, views[0], dtype) if op.name == "ft.cast" else emit_elementwise(self, views, op)
        return Emitted(self.tmp(text), dtype, self.axes)

    def materialize(self, e: Emitted) -> str:
        """`e` as a Triton tensor (literals become `tl.full`, so methods like `.to` apply)."""
        if e.constant is None or e.text.startswith("tl.full("):
            return e.text
        return f"tl.full([], {e.text}, {compute_type(e.dtype)})"

    # --- index rewriting through views -------------------------------------------------

    def _view_index(self, op: Operation, index: tuple[Index, ...]) -> tuple[Index, ...]:
        source = self.shapes.of(op.operands[0])
        if op.name == "ft.transpose":
            out = [ZERO] * len(source)
            for i, p in enumerate(op.attributes["perm"]):
                out[p] = index[i]
            return tuple(out)
        if op.name == "ft.broadcast_to":
            return _aligned(source, self.shapes.of(op.results[0]), index)
        if op.name == "ft.slice":
            return self._slice_index(op, source, index)
        return self._reshape_index(source, self.shapes.of(op.results[0]), index)

    def _slice_index(self, op: Operation, source: Shape, index: tuple[Index, ...]) -> tuple[Index, ...]:
        dim = op.attributes["dim"] % len(source)
        start, end, step = (op.attributes[k] for k in ("start", "end", "step"))
        if isinstance(source[dim], int):
            first = str(slice(start, end, step).indices(source[dim])[0])
        else:
            first = self.size(f"range({source[dim]})[{start}:{end}:{step}].start")
        position = index[dim]
        scaled = position.expr if step == 1 else f"{position.expr} * {step}"
        if position.expr == "0":
            moved = Index(first, NONE)
        elif first == "0":
            moved = position if step == 1 else self.index_var(scaled, position.axes)
        else:
            moved = self.index_var(f"{scaled} + {first}", position.axes)
        return tuple(moved if d == dim else i for d, i in enumerate(index))

    def _reshape_index(self, source: Shape, result: Shape, index: tuple[Index, ...]) -> tuple[Index, ...]:
        source_live = [j for j, d in enumerate(source) if d != 1]
        result_live = [j for j, d in enumerate(result) if d != 1]
        if [source[j] for j in source_live] == [result[j] for j in result_live]:
            # Only unit dims come or go: dims map one to one.
            out = [ZERO] * len(source)
            for j, i in zip(source_live, result_live):
                out[j] = index[i]
            return tuple(out)
        flat = self.linear(index, result)
        if flat.expr == "0":
            return tuple(ZERO for _ in source)
        return tuple(self.delinearize(flat.expr, source, flat.axes))

    # --- loads and stores ---------------------------------------------------------------

    def mask(self, axes: frozenset[str]) -> str | None:
        raise NotImplementedError

    def store(self, k: int, value: Emitted, offset: Index, anchor: str) -> None:
        """Write `value` to output k at `offset`.  When the offset does not vary along every
        axis the value does (or along none), `+ 0 * anchor` (the flat index or the rows)
        keeps the pointer as wide as the value and the mask."""
        dtype = self.yields[k].type.dtype
        self.narrowest_bytes = min(self.narrowest_bytes, max(1, dtype.bitwidth // 8))
        text = self.materialize(value)
        if compute_type(dtype) != storage_type(dtype):
            text = f"{text}.to({storage_type(dtype)})"
        axes = offset.axes | value.axes
        pointer = f"out{k} + {offset.expr}"
        if not offset.axes or not offset.axes >= value.axes:
            pointer += f" + 0 * {anchor}"
            axes |= X
        mask = self.mask(axes)
        self.line(f"tl.store({pointer}, {text}{f', mask={mask}' if mask else ''})", axes)

    # --- the module ----------------------------------------------------------------------

    def kernel_name(self) -> str:
        skip = VIEWS | {"ft.constant", "ft.yield"}
        names = list(dict.fromkeys(op.short_name for op in self.block.ops if op.name not in skip))
        return "fused_" + "_".join(names[:4] or ["copy"])

    def module_source(self, name: str, constexprs: dict[str, int], grid: tuple[Sequence[Dim], str],
                      numel: Sequence[Dim], num_warps: int) -> KernelSource:
        """Assemble the module once the body is written (sizes are known only then)."""
        tensor_inputs = [a.index for a in self.block.args if isinstance(a.type, TensorType)]
        scalar_inputs = [a.index for a in self.block.args if not isinstance(a.type, TensorType)]
        outputs = [{"shape": [self._launch_dim(d) for d in self.shapes.of(y)], "dtype": str(y.type.dtype.torch_dtype)}
                   for y in self.yields]
        count, numel = [self._launch_dim(d) for d in grid[0]], [self._launch_dim(d) for d in numel]
        equal = [list(pair) for pair in sorted(self.shapes.assumed, key=repr)]
        # Every size is known now (the launch description may name some the body does not).
        params = [f"in{a.index}" for a in self.block.args]
        params += [f"out{k}" for k in range(len(self.yields))]
        params += list(self.size_params.values())
        params += [f"in{k}_stride{d}" for k in tensor_inputs for d in range(self.block.args[k].type.rank)]
        signature = ", ".join([*params, "INDEX_64: tl.constexpr", *(f"{c}: tl.constexpr" for c in constexprs)])
        launch = {
            "kernel": name,
            "sizes": list(self.size_params),
            "tensor_inputs": tensor_inputs,
            "outputs": outputs,
            "grid": {"count": count, "per_program": grid[1]},
            "numel": numel,
            "constexprs": constexprs,
            "num_warps": num_warps,
            "equal_sizes": equal,
            "do_not_specialize": [*self.size_params.values(), *(f"in{k}" for k in scalar_inputs)],
        }
        region = "\n".join("#   " + line for line in print_op(self.fusion).splitlines())
        source = "\n".join([
            "# Triton kernel generated by flagtree from this ft.fusion region",
            "# (the launch plan's header names the region's location and the cache key):",
            "#",
            region,
            "import triton.language as tl",
            "",
            f"LAUNCH = {pprint.pformat(launch, width=110, sort_dicts=False)}",
            "",
            "",
            f"def {name}({signature}):",
            *("    " + line for line in self.top),
        ]) + "\n"
        return KernelSource(name, source, launch)

    def _launch_dim(self, d: Dim) -> int | str:
        return d if isinstance(d, int) else self.size(d)

    def preamble(self) -> None:
        self.top += ["pid = tl.program_id(0)", "if INDEX_64:", "    pid = pid.to(tl.int64)"]


def _fits(a: Dim, b: Dim, exact: bool) -> bool:
    """Whether sizes a and b are the same, or (not exact) may be, one being a run-time size."""
    return a == b or (not exact and (isinstance(a, str) or isinstance(b, str)))


def _static_product(dims: Sequence[Dim]) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        total *= d
    return total


class _ElementwiseKernel(_Kernel):
    def generate(self) -> KernelSource:
        iteration = broadcast([self.shapes.of(y) for y in self.yields], self.shapes.assumed)
        numel = self.product(iteration)
        self.preamble()
        self.top += ["offsets = pid * BLOCK + tl.arange(0, BLOCK)", f"mask = offsets < {numel}"]
        flat_index = self.delinearize("offsets", iteration, X, [f"x{d}" for d in range(len(iteration))])
        for k, y in enumerate(self.yields):
            shape = self.shapes.of(y)
            index = _aligned(shape, iteration, flat_index)
            value = self.value(y, index)
            offset = Index("offsets", X) if shape == iteration else self.linear(index, shape)
            self.store(k, value, offset, "offsets")
        tiling = elementwise_tiling(self.caps, _static_product(iteration), self.narrowest_bytes)
        return self.module_source(self.kernel_name(), {"BLOCK": tiling.block}, (iteration, "BLOCK"), iteration,
                                  tiling.num_warps)

    def mask(self, axes: frozenset[str]) -> str | None:
        return "mask" if axes else None


@dataclass
class _Reduction:
    """One accumulation over the row: `source` is the accumulated value at a full index."""

    combine: str  # sum | max | min | any | all
    dtype: ScalarType  # of the accumulated values
    source: Callable[[tuple[Index, ...]], Emitted]
    level: int
    result: Emitted | None = field(default=None)


_IDENTITY = {"sum": lambda t: "0" if t.is_integer else "0.0", "max": lowest, "min": highest,
             "any": lambda t: "0", "all": lambda t: "1"}


class _ReductionKernel(_Kernel):
    def __init__(self, fusion: Operation, caps: Capabilities):
        super().__init__(fusion, caps)
        roots = [op for op in self.block.ops if op.name in REDUCTIONS | ROW_NORMALIZERS]
        unsupported = [op.name for op in self.block.ops if has_trait(op, REDUCTION) and op.name not in REDUCTIONS]
        if unsupported:
            raise UnsupportedRegion(f"reduction '{unsupported[0]}' has no Triton lowering yet")
        dims = {reduced_dims(op) for op in roots}
        if len(dims) != 1:
            raise UnsupportedRegion(f"the region reduces over different dims {sorted(dims)}; one set per kernel")
        self.reduced = dims.pop()
        inputs = [self.shapes.of(op.operands[0]) for op in roots]
        if len({len(s) for s in inputs}) != 1:
            raise UnsupportedRegion("the region's reductions read tensors of different ranks")
        self.iteration = broadcast(inputs, self.shapes.assumed)
        self.kept = [d for d in range(len(self.iteration)) if d not in self.reduced]
        self.nodes: dict[int, list[_Reduction]] = {}
        self.levels: dict[int, int] = {}
        for op in self.block.ops[:-1]:
            self._plan(op)

    # --- which reductions run in which pass ---------------------------------------------------

    def _level(self, v: Value) -> int:
        return self.levels.get(id(v), 0)

    def _plan(self, op: Operation) -> None:
        level = max((self._level(v) for v in op.operands), default=0)
        x = op.operands[0] if op.operands else None
        if op.name in ROW_NORMALIZERS:
            dtype = op.results[0].type.dtype
            row_max = _Reduction("max", dtype, lambda i, x=x, op=op: self._converted(x, i, op), level + 1)
            exp_sum = _Reduction("sum", dtype, lambda i, op=op, m=row_max: self._shifted_exp(op, m, i), level + 2)
            self.nodes[id(op)] = [row_max, exp_sum]
            level += 2
        elif op.name in REDUCTIONS:
            combine = {"ft.sum": "sum", "ft.mean": "sum", "ft.amax": "max", "ft.amin": "min", "ft.any": "any",
                       "ft.all": "all"}[op.name]
            self.nodes[id(op)] = [_Reduction(combine, x.type.dtype, lambda i, x=x: self.value(x, i), level + 1)]
            level += 1
        for r in op.results:
            self.levels[id(r)] = level

    def _converted(self, x: Value, index: tuple[Index, ...], op: Operation) -> Emitted:
        """x cast to op's result type (softmax computes in its result type), once per index."""
        e = self.value(x, index)
        target = op.results[0].type.dtype
        if cast_is_free(e.dtype, target):
            return Emitted(e.text, target, e.axes, e.constant)
        key = (id(op), ("converted", *(i.expr for i in index)))
        if key not in self.memo:
            self.axes = e.axes
            text = self.tmp(cast(self, Operand(self.materialize(e), e.dtype), target))
            self.memo[key] = Emitted(text, target, e.axes)
        return self.memo[key]

    def _shifted_exp(self, op: Operation, row_max: _Reduction, index: tuple[Index, ...]) -> Emitted:
        x = self._converted(op.operands[0], index, op)
        self.axes = x.axes | X
        return Emitted(self.tmp(f"tl.exp({x.text} - {row_max.result.text})"), x.dtype, self.axes)

    # --- kernel body ------------------------------------------------------------------------

    def generate(self) -> KernelSource:
        kept_dims = [self.iteration[d] for d in self.kept]
        row_dims = [self.iteration[d] for d in self.reduced]
        num_rows, row_length = self.product(kept_dims), self.product(row_dims)
        self.row_length = row_length
        tiling = reduction_tiling(self.caps, _static_product(kept_dims), _static_product(row_dims))
        self.persistent = tiling.persistent
        self.preamble()
        self.top += ["rows = pid * ROWS + tl.arange(0, ROWS)[:, None]", f"row_mask = rows < {num_rows}"]
        self.full_index = [ZERO] * len(self.iteration)
        kept_names = [f"x{d}" for d in self.kept]
        for d, i in zip(self.kept, self.delinearize("rows", kept_dims, X, kept_names)):
            self.full_index[d] = i
        self.top += ["rbase = tl.arange(0, RBLOCK)[None, :]", "if INDEX_64:", "    rbase = rbase.to(tl.int64)"]
        if self.persistent:
            self._row_block_index("rbase")
        for level in sorted({n.level for nodes in self.nodes.values() for n in nodes}):
            self._reduction_pass([n for nodes in self.nodes.values() for n in nodes if n.level == level])
        self._store_outputs()
        constexprs = {"ROWS": tiling.rows, "RBLOCK": tiling.row_block}
        return self.module_source(self.kernel_name(), constexprs, (kept_dims, "ROWS"), self.iteration,
                                  tiling.num_warps)

    def _row_block_index(self, rindex: str) -> None:
        """Define rindex, the masks and the reduced dims' indices (in the loop when looping)."""
        if rindex != "rindex":
            self.line(f"rindex = {rindex}", R)
        self.line(f"rmask = rindex < {self.row_length}", R)
        self.line("mask = row_mask & rmask", R)
        reduced = [self.iteration[d] for d in self.reduced]
        indices = self.delinearize("rindex", reduced, R, [f"r{d}" for d in self.reduced])
        for d, i in zip(self.reduced, indices):
            self.full_index[d] = i

    def _open_pass(self) -> None:
        if not self.persistent:
            self.open_loop(f"for roffset in tl.range(0, {self.row_length}, RBLOCK):")
            self._row_block_index("roffset + rbase")

    def _close_pass(self) -> None:
        if not self.persistent:
            self.close_loop()

    def _reduction_pass(self, nodes: list[_Reduction]) -> None:
        accumulators = []
        for node in nodes:
            acc = f"acc{next(self.counter)}"
            accumulators.append(acc)
            if not self.persistent:
                self.top.append(f"{acc} = tl.full([ROWS, RBLOCK], {self._identity(node)}, {self._acc_type(node)})")
        self._open_pass()
        for node, acc in zip(nodes, accumulators):
            term = f"tl.where(mask, {self._accumulated(node)}, {self._identity(node)})"
            if self.persistent:
                self.line(f"{acc} = {term}", R)
            else:
                self.line(f"{acc} = {self._combine(node, acc, term)}", R)
        self._close_pass()
        for node, acc in zip(nodes, accumulators):
            node.result = self._finish(node, acc)

    def _acc_type(self, node: _Reduction) -> str:
        dtype = node.dtype
        if node.combine in ("any", "all"):
            return "tl.int32"
        if node.combine == "sum" and not dtype.is_float:
            return "tl.int64"
        return compute_type(dtype)

    def _identity(self, node: _Reduction) -> str:
        return _IDENTITY[node.combine](node.dtype)

    def _accumulated(self, node: _Reduction) -> str:
        e = node.source(tuple(self.full_index))
        text = self.materialize(e)
        if node.combine in ("any", "all"):
            return f"({text} != 0).to(tl.int32)"
        if node.combine == "sum" and not e.dtype.is_float:
            return f"{text}.to(tl.int64)"
        return text

    def _combine(self, node: _Reduction, acc: str, term: str) -> str:
        if node.combine == "sum":
            return f"{acc} + {term}"
        fn = "tl.maximum" if node.combine in ("max", "any") else "tl.minimum"
        nan = f", {NAN_ALL}" if node.dtype.is_float and node.combine in ("max", "min") else ""
        return f"{fn}({acc}, {term}{nan})"

    def _finish(self, node: _Reduction, acc: str) -> Emitted:
        """Reduce the accumulator across the row block (tl.max/min drop NaN on GPUs, so a
        row with a NaN is patched to NaN, as torch.amax/amin propagate it)."""
        dtype = node.dtype
        name = f"red{next(self.counter)}"
        fn = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min", "any": "tl.max", "all": "tl.min"}[node.combine]
        self.top.append(f"{name} = {fn}({acc}, axis=1, keep_dims=True)")
        if node.combine in ("any", "all"):
            self.top.append(f"{name} = {name} > 0")
            return Emitted(name, I1, X)
        if node.combine in ("max", "min") and dtype.is_float:
            self.top.append(f'{name} = tl.where(tl.max(({acc} != {acc}).to(tl.int32), axis=1, keep_dims=True) > 0, '
                            f'float("nan"), {name})')
        return Emitted(name, dtype, X)

    def reduced_value(self, op: Operation, index: tuple[Index, ...]) -> Emitted:
        nodes = self.nodes[id(op)]
        dtype = op.results[0].type.dtype
        if op.name in ROW_NORMALIZERS:
            return self._normalized(op, nodes, dtype, index)
        if "r" in _union(index):
            raise UnsupportedRegion(f"the result of '{op.name}' is read along the reduced dims")
        red = nodes[0].result
        self.axes = X
        if op.name == "ft.mean":
            mean = f"{red.text} / {self.divisor([self.iteration[d] for d in self.reduced])}"
            return Emitted(self.tmp(rounded(mean, dtype)), dtype, X)
        if op.name == "ft.sum" and not dtype.is_float:
            return Emitted(self.tmp(cast(self, Operand(red.text, I64), dtype)), dtype, X)
        if op.name == "ft.sum" and is_narrow(dtype):
            return Emitted(self.tmp(rounded(red.text, dtype)), dtype, X)
        return Emitted(red.text, dtype, X)  # amax, amin: one of the row's values

    def _normalized(self, op: Operation, nodes: list[_Reduction], dtype: ScalarType,
                    index: tuple[Index, ...]) -> Emitted:
        """softmax / log_softmax at `index`, from the row's max and sum of exponentials."""
        row_max, exp_sum = (n.result.text for n in nodes)
        x = self._converted(op.operands[0], index, op)
        self.axes = x.axes | X
        if op.name == "ft.softmax":
            return Emitted(self.tmp(rounded(f"tl.exp({x.text} - {row_max}) / {exp_sum}", dtype)), dtype, self.axes)
        return Emitted(self.tmp(rounded(f"{x.text} - {row_max} - tl.log({exp_sum})", dtype)), dtype, self.axes)

    # --- outputs -------------------------------------------------------------------------------

    def _store_outputs(self) -> None:
        frames = self._frames()
        full, rows = [], []
        for k, y in enumerate(self.yields):
            index = self._output_index(y, frames.get(id(y)))
            (full if "r" in _union(index) else rows).append((k, y, index))
        if full:
            self._open_pass()
            for k, y, _ in full:
                index = self._output_index(y, frames.get(id(y)))
                self.store(k, self.value(y, index), self.linear(index, self.shapes.of(y)), "rows")
            self._close_pass()
        for k, y, index in rows:
            self.store(k, self.value(y, index), self.linear(index, self.shapes.of(y)), "rows")

    def _output_index(self, y: Value, frame: tuple[int | None, ...] | None) -> tuple[Index, ...]:
        """The full index `y` is stored at; sizes the mapping takes to be equal are checked at launch."""
        shape = self.shapes.of(y)
        if frame is None:
            frame = self._input_frame(shape, downstream_of_reduction=self._level(y) > 0)
        pairs = [(d, self.iteration[f]) for d, f in zip(shape, frame) if d != 1 and f is not None]
        if any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in pairs):
            raise UnsupportedRegion(f"a yielded value of shape {list(shape)} does not map onto the iteration "
                                    f"shape {list(self.iteration)}")
        self.shapes.assumed.update(assumption(a, b) for a, b in pairs if a != b)
        return tuple(ZERO if d == 1 or f is None else self.full_index[f] for d, f in zip(shape, frame))

    def _input_frame(self, shape: Shape, downstream_of_reduction: bool) -> tuple[int | None, ...]:
        """Where a yielded value with no known frame lies: right-aligned in the iteration
        shape, or along the kept dims; exact size matches first, then run-time sizes
        assumed equal, in the order its data flow makes likely."""
        rank = len(self.iteration)
        aligned = tuple(range(rank - len(shape), rank)) if len(shape) <= rank else None
        kept = tuple(self.kept) if len(shape) == len(self.kept) else None
        candidates = [kept, aligned] if downstream_of_reduction else [aligned, kept]
        for exact in (True, False):
            for frame in filter(None, candidates):
                if all(d == 1 or _fits(d, self.iteration[f], exact) for d, f in zip(shape, frame)):
                    return frame
        raise UnsupportedRegion(f"a yielded value of shape {list(shape)} does not map onto the iteration "
                                f"shape {list(self.iteration)}")

    def _frames(self) -> dict[int, tuple[int | None, ...]]:
        """For values downstream of a reduction: which iteration dim each of their dims
        runs along (None: a broadcast unit dim).  Values computed from inputs alone are
        left out; they take the iteration shape right-aligned."""
        frames: dict[int, tuple[int | None, ...]] = {}
        rank = len(self.iteration)
        for op in self.block.ops[:-1]:
            known = [frames.get(id(v)) for v in op.operands]
            if op.name in REDUCTIONS:
                keep = op.attributes.get("keepdim", False)
                frame = tuple(None if d in self.reduced else d for d in range(rank) if keep or d not in self.reduced)
            elif op.name in ROW_NORMALIZERS:
                frame = tuple(range(rank))
            elif not any(f is not None for f in known):
                continue
            elif op.name == "ft.transpose":
                frame = tuple(known[0][p] for p in op.attributes["perm"])
            elif op.name == "ft.reshape":
                frame = self._reshaped_frame(op, known[0])
                if frame is None:
                    continue
            else:
                frame = self._broadcast_frame(op, known)
            for r in op.results:
                frames[id(r)] = frame
        return frames

    def _reshaped_frame(self, op: Operation, frame: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
        source, result = self.shapes.of(op.operands[0]), self.shapes.of(op.results[0])
        source_live = [j for j, d in enumerate(source) if d != 1]
        result_live = [j for j, d in enumerate(result) if d != 1]
        if [source[j] for j in source_live] != [result[j] for j in result_live]:
            return None
        out: list[int | None] = [None] * len(result)
        for j, i in zip(source_live, result_live):
            out[i] = frame[j]
        return tuple(out)

    def _broadcast_frame(self, op: Operation, known: list[tuple[int | None, ...] | None]) -> tuple[int | None, ...]:
        shape = self.shapes.of(op.results[0])
        out: list[int | None] = []
        for j, d in enumerate(shape):
            from_right = len(shape) - j
            entry = None
            for v, frame in zip(op.operands, known):
                operand = self.shapes.of(v)
                if frame is not None and from_right <= len(operand) and operand[-from_right] != 1:
                    entry = frame[-from_right]
                    break
            else:
                aligned = len(self.iteration) - from_right
                entry = aligned if d != 1 and aligned >= 0 else None
            out.append(entry)
        return tuple(out)

    def mask(self, axes: frozenset[str]) -> str | None:
        if axes >= XR:
            return "mask"
        return "row_mask" if "x" in axes else "rmask" if "r" in axes else None
