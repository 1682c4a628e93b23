"""FTIR kernel units → one MLIR `func.func` on tensors (linalg, tensor, arith, math, bufferization).

A kernel unit is an `ft.fusion` region or a single elementwise/reduction op.  The function
takes one memref per tensor input (identity layout: the caller passes contiguous tensors),
one scalar per scalar input, then one memref per output, which it fills through
`bufferization.materialize_in_destination`; `llvm.emit_c_interface` gives it the C ABI
the ExecutionEngine calls.

A concatenation is computed piece by piece: each piece's loop nest writes its slice of the
output (or, when other ops of the unit read it, of a kernel-local tensor), so no loop reads
a piece's inputs beyond their bounds, and pieces of one shape share a loop nest.

Dynamic dims (`?`) keep their runtime sizes as `index` SSA values.  A `?` dim is assumed
never to be a broadcast size 1 (Dynamo specialises sizes 0 and 1; the kernel wrapper checks
it at run time), so `?` dims of one broadcast position are equal and broadcasting is static.

Elementwise ops and views build lazy expressions (expr.py); loops are emitted only for
reductions, outputs and reshapes that are not views.  A unit whose results share a row
axis (tiling.py) is emitted in row blocks: an `scf.for` over blocks of a `[lo, hi)` row
range, so a softmax or norm reads each block from memory once and threads can split rows.

f16/bf16 values are computed in f32, and every op rounds its result to its type, as eager
torch stores each op's result in it: the kernel computes what the program's types say.
Keeping a chain of bf16 ops in f32 would be closer to exact arithmetic but not to the
program: a later cast to f32 would keep digits the bf16 value never had, and a comparison,
`floor` or integer cast of the unrounded value can differ from eager's by a whole step.
Reductions (sum, mean, var, prod, softmax) accumulate in f32 and round once, at the end,
as torch's kernels do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flagtree.backends.cpu import approx, scalar_ops
from flagtree.backends.cpu.expr import (
    Apply,
    Index,
    Joined,
    Lazy,
    Leaf,
    Map,
    Node,
    Rounded,
    Scalar,
    Size,
    Tensor,
    as_tensor_read,
    identity,
    leaf,
    leaves,
    reindex,
    rounded,
)
from flagtree.backends.cpu.mlir_text import (
    FunctionWriter,
    UnsupportedError,
    compute_type,
    is_narrow_float,
    memref_type,
    storage_type,
    tensor_type,
)
from flagtree.ir.attributes import DenseAttr, format_attribute
from flagtree.ir.core import Operation, Value
from flagtree.ir.opdef import ELEMENTWISE, has_trait
from flagtree.ir.ops.shape import unit_dim_map
from flagtree.ir.types import F64, I64, ScalarType, TensorType

_SCALAR_ARG_TYPES = frozenset({"i64", "i32", "f64", "f32"})
REDUCTIONS = frozenset({"ft.sum", "ft.prod", "ft.mean", "ft.amax", "ft.amin", "ft.any", "ft.all", "ft.var"})
ARG_REDUCTIONS = frozenset({"ft.argmax", "ft.argmin"})
SOFTMAX = frozenset({"ft.softmax", "ft.log_softmax"})
# Elementwise ops whose f32 result is already a value of their f16/bf16 result type, so they
# skip the rounding: the result is one of their operands' values, or an integer within 1 of
# one (a float type holds every integer up to where its spacing exceeds 1, and above that
# only integers); a cast rounds to its type by itself.
_EXACT_IN_RESULT_TYPE = frozenset({
    "ft.neg", "ft.abs", "ft.relu", "ft.sign", "ft.floor", "ft.ceil", "ft.trunc", "ft.round", "ft.where",
    "ft.maximum", "ft.minimum", "ft.cast",
})


@dataclass(frozen=True, eq=False)
class KernelUnit:
    """What one kernel computes: `ops` from `args` to `results` (FTIR values)."""

    name: str
    args: tuple[Value, ...]
    ops: tuple[Operation, ...]
    results: tuple[Value, ...]

    @staticmethod
    def from_fusion(op: Operation, name: str) -> KernelUnit:
        block = op.regions[0].block
        body = tuple(o for o in block.ops if o.name != "ft.yield")
        return KernelUnit(name, tuple(block.args), body, tuple(block.terminator.operands))

    @staticmethod
    def from_op(op: Operation, name: str) -> KernelUnit:
        return KernelUnit(name, tuple(op.operands), (op,), tuple(op.results))


@dataclass(frozen=True)
class EmittedKernel:
    """A kernel's MLIR function text and the helper functions it calls."""

    name: str
    function: str
    helpers: frozenset[str]

    def module(self) -> str:
        """A complete module: helpers, then the kernel."""
        return module_text([self])


def module_text(kernels: Sequence[EmittedKernel]) -> str:
    """One MLIR module holding `kernels` and each helper they call, once."""
    helpers = sorted(set().union(*(k.helpers for k in kernels)))
    parts = [_helper_text(h) for h in helpers] + [k.function for k in kernels]
    return "module {\n" + "\n".join(parts) + "}\n"


def _helper_text(helper: str) -> str:
    if helper.startswith("libm:"):
        _, symbol, mlir_type = helper.split(":")
        return f"  func.func private @{symbol}({mlir_type}) -> {mlir_type}\n"
    return approx.FUNCTIONS[helper]


def emit_kernel(unit: KernelUnit, rows: frozenset[int] | None = None) -> EmittedKernel:
    """The MLIR function computing `unit`; raises UnsupportedError naming the first op or
    type it cannot lower.

    rows: the ids of the values whose dim 0 is the row axis (tiling.row_values).  Then the
    function takes the row range `%lo, %hi` to compute, after the outputs, and walks it in
    blocks of about BLOCK_ELEMENTS elements per row value: inputs are sliced per block,
    intermediates are per block (cache-resident), outputs are written block by block."""
    return _KernelEmitter(unit, rows or frozenset()).emit()


@dataclass(frozen=True)
class _Write:
    """Where a kernel writes a value: output memref `output` of type `type`, whole (window
    None) or the window (offsets, sizes) of it."""

    output: str
    type: TensorType
    window: tuple[Sequence[Size], Sequence[Size]] | None


EnvValue = Lazy | Scalar | Joined  # tensors are Lazy (a plain tensor is a Lazy read of it) or Joined

BLOCK_ELEMENTS = 1024  # per row value and block: 4 KiB of f32, so a block's passes hit L1 (measured best)


class _KernelEmitter:
    def __init__(self, unit: KernelUnit, rows: frozenset[int]):
        self.unit = unit
        self.rows = rows
        self.w = FunctionWriter()
        self.env: dict[int, EnvValue] = {}
        self.params: list[str] = []
        self.block: tuple[str, str] | None = None  # (first row, row count) of the current block

    # ------------------------------------------------------------------ structure
    def emit(self) -> EmittedKernel:
        for i, arg in enumerate(self.unit.args):
            self.env[id(arg)] = self._parameter(f"%arg{i}", arg)
        outputs = self._output_parameters()
        if self.rows:
            self._emit_row_blocks(outputs)
        else:
            self._lower_ops()
            self._write_outputs(outputs)
        self.w.line("return")
        signature = ", ".join(self.params)
        text = (f"  func.func @{self.unit.name}({signature}) attributes {{llvm.emit_c_interface}} {{\n"
                + "\n".join(self.w.body()) + "\n  }\n")
        return EmittedKernel(self.unit.name, text, frozenset(self.w.helpers))

    def _lower_ops(self) -> None:
        for op in self.unit.ops:
            try:
                self._lower(op)
            except UnsupportedError as e:
                raise UnsupportedError(f"{op.location}: '{op.name}' op: {e}") from None

    def _emit_row_blocks(self, outputs: list[str]) -> None:
        """for each block of rows in [lo, hi): slice the row inputs, compute, write the rows."""
        w = self.w
        self.params += ["%lo: index", "%hi: index"]
        per_row = self._row_elements()
        rows_per_block = w.emit(f"arith.divui {w.index(BLOCK_ELEMENTS)}, {per_row} : index")
        step = w.emit(f"arith.maxui {rows_per_block}, {w.index(1)} : index")
        first = w.fresh("row")
        w.line(f"scf.for {first} = %lo to %hi step {step} {{")
        w.depth += 1
        remaining = w.emit(f"arith.subi %hi, {first} : index")
        count = w.emit(f"arith.minui {step}, {remaining} : index")
        self.block = (first, count)
        for arg in self.unit.args:
            if id(arg) in self.rows:
                self.env[id(arg)] = self._row_slice(self.env[id(arg)])
        self._lower_ops()
        self._write_outputs(outputs)
        w.depth -= 1
        w.line("}")

    def _row_elements(self) -> str:
        """Elements per row of the widest row input (per row of the first output without one)."""
        widths = [self._product(self.env[id(a)].sizes[1:]) for a in self.unit.args if id(a) in self.rows]
        if not widths:
            first = self.unit.results[0].type
            widths = [self.w.index(math.prod(d for d in first.shape[1:] if d is not None))]
        widest = widths[0]
        for width in widths[1:]:
            widest = self.w.emit(f"arith.maxui {widest}, {width} : index")
        return widest

    def _product(self, sizes: Sequence[Size]) -> str:
        product = self.w.index(math.prod(s for s in sizes if isinstance(s, int)))
        for size in sizes:
            if not isinstance(size, int):
                product = self.w.emit(f"arith.muli {product}, {size} : index")
        return product

    def _row_slice(self, value: EnvValue) -> Lazy:
        """The current block's rows of a row input."""
        tensor = as_tensor_read(value)
        first, count = self.block
        shape = (None, *tensor.shape[1:])
        sizes = (count, *tensor.sizes[1:])
        offsets = ", ".join([first] + ["0"] * (tensor.rank - 1))
        ssa = self.w.emit(f"tensor.extract_slice {tensor.ssa}[{offsets}] [{', '.join(map(str, sizes))}] "
                          f"[{', '.join(['1'] * tensor.rank)}] : {tensor_type(tensor.shape, tensor.element)} to "
                          f"{tensor_type(shape, tensor.element)}")
        return leaf(Tensor(ssa, shape, tensor.element, sizes), value.dtype)

    def _parameter(self, name: str, arg: Value) -> EnvValue:
        t = arg.type
        if isinstance(t, TensorType):
            element = storage_type(t.dtype)
            self.params.append(f"{name}: {memref_type(t.shape, element)}")
            ssa = self.w.emit(f"bufferization.to_tensor {name} restrict : {memref_type(t.shape, element)} to "
                              f"{tensor_type(t.shape, element)}", "t")
            return leaf(Tensor(ssa, t.shape, element, self._dim_sizes(ssa, t.shape, element)), t.dtype)
        if t.name not in _SCALAR_ARG_TYPES:
            raise UnsupportedError(f"scalar kernel argument of type {t} (supported: {sorted(_SCALAR_ARG_TYPES)})")
        self.params.append(f"{name}: {t.name}")
        return Scalar(name, t)

    def _dim_sizes(self, ssa: str, shape: tuple[int | None, ...], element: str) -> tuple[Size, ...]:
        return tuple(d if d is not None else self.w.emit(
            f"tensor.dim {ssa}, {self.w.index(i)} : {tensor_type(shape, element)}", "d") for i, d in enumerate(shape))

    def _output_parameters(self) -> list[str]:
        names = []
        for index, value in enumerate(self.unit.results):
            if not isinstance(value.type, TensorType):
                raise UnsupportedError(f"kernel result #{index} is a scalar ({value.type}); results must be tensors")
            names.append(f"%out{index}")
            self.params.append(f"%out{index}: {memref_type(value.type.shape, storage_type(value.type.dtype))}")
        return names

    def _write_outputs(self, outputs: list[str]) -> None:
        """Compute every result into its output memref (the current block's rows of it), a
        concatenation piece by piece into its slices; values with one iteration space share
        one loop nest (a rotary's two halves, a piece also yielded on its own)."""
        groups: dict[tuple, list[tuple[Lazy, _Write]]] = {}
        for index, value in enumerate(self.unit.results):
            env = self.env[id(value)]
            if isinstance(env, Joined):
                if self.block is not None:
                    raise UnsupportedError("a concatenation in a kernel computed in row blocks")
                writes = [(piece, _Write(outputs[index], value.type, (offsets, sizes)))
                          for piece, offsets, sizes in self._windows(env)]
            else:
                writes = [(self._lazy(env), _Write(outputs[index], value.type, None))]
            for lazy, write in writes:
                groups.setdefault((lazy.shape, lazy.sizes), []).append((lazy, write))
        for members in groups.values():
            elements = [storage_type(write.type.dtype) for _, write in members]
            tensors = self._materialize([lazy for lazy, _ in members], elements, reuse=False)
            for (_, write), tensor in zip(members, tensors):
                self._store(tensor, *self._destination(write, tensor))

    def _destination(self, write: _Write, tensor: Tensor) -> tuple[str, str]:
        """Where a computed value goes (SSA name, memref type): its window of the output, in
        row blocks the block's rows, else the whole output."""
        window = write.window
        if window is None and self.block is not None:
            first, count = self.block
            window = ([first] + [0] * (write.type.rank - 1), (count, *tensor.sizes[1:]))
        if window is None:
            return write.output, memref_type(write.type.shape, storage_type(write.type.dtype))
        return self._subview(write.output, write.type, *window)

    def _store(self, tensor: Tensor, destination: str, memref: str) -> None:
        self.w.line(f"bufferization.materialize_in_destination {tensor.ssa} in restrict writable {destination} : "
                    f"({tensor_type(tensor.shape, tensor.element)}, {memref}) -> ()")

    def _subview(self, output: str, t: TensorType, offsets: Sequence[Size], sizes: Sequence[Size]) -> tuple[str, str]:
        """A window of an output memref of type `t`: its SSA name and memref type."""
        element = storage_type(t.dtype)
        memref = memref_type(t.shape, element)
        strides = [math.prod(t.shape[k + 1:]) if None not in t.shape[k + 1:] else None for k in range(t.rank)]
        layout = ", ".join("?" if s is None else str(s) for s in strides)
        static = all(isinstance(o, int) and (o == 0 or s is not None) for o, s in zip(offsets, strides))
        offset = sum(o * s for o, s in zip(offsets, strides) if o) if static else "?"
        shape = "".join(f"{size}x" if isinstance(size, int) else "?x" for size in sizes)
        view = f"memref<{shape}{element}, strided<[{layout}], offset: {offset}>>"
        ssa = self.w.emit(f"memref.subview {output}[{_comma_list(offsets)}] [{_comma_list(sizes)}] "
                          f"[{_comma_list([1] * t.rank)}] : {memref} to {view}")
        return ssa, view

    # ------------------------------------------------------------------ op dispatch
    def _lower(self, op: Operation) -> None:
        values = self._lower_values(op)
        for result, value in zip(op.results, values):
            self.env[id(result)] = value

    def _lower_values(self, op: Operation) -> list[EnvValue]:
        if op.name in REDUCTIONS | ARG_REDUCTIONS | SOFTMAX:
            self._share_expensive_operand(op.operands[0])
        operands = [self._read(v) for v in op.operands]
        if has_trait(op, ELEMENTWISE):
            return [self._elementwise(op, operands)]
        handler = _HANDLERS.get(op.name)
        if handler is None:
            raise UnsupportedError("no cpu lowering for this op (it runs through the reference fallback)")
        return [handler(self, op, operands)]

    def _read(self, value: Value) -> EnvValue:
        """`value` as an operand: a concatenation read by another op is computed into a
        (kernel-local) tensor first, once, then read like any tensor."""
        env = self.env[id(value)]
        if isinstance(env, Joined):
            env = leaf(self._join(env, compute_type(env.dtype)), env.dtype)
            self.env[id(value)] = env
        return env

    def _share_expensive_operand(self, value: Value) -> None:
        """A reduction walks its operand in a loop of its own; when other ops read the same
        value in other loops and it costs transcendental math, compute it once into the
        block's (cache-resident) buffer instead of once per loop."""
        lazy = self.env[id(value)]
        if self.block is None or len(value.users) < 2 or not isinstance(lazy, Lazy) or not _expensive(lazy.node):
            return
        self.env[id(value)] = self._materialized(lazy)

    def _result_type(self, op: Operation) -> TensorType:
        """The type op's result has here: in row blocks, a row value's dim 0 is the block's."""
        t = op.results[0].type
        if not isinstance(t, TensorType):
            raise UnsupportedError(f"expected a tensor result, got {t}")
        if self.block is not None and id(op.results[0]) in self.rows:
            return TensorType((None, *t.shape[1:]), t.dtype)
        return t

    # ------------------------------------------------------------------ elementwise
    def _elementwise(self, op: Operation, operands: list[EnvValue]) -> EnvValue:
        if not isinstance(op.results[0].type, TensorType):
            return self._scalar_op(op, operands)
        result = self._result_type(op)
        tensors = [self._lazy(v) for v in operands if not isinstance(v, Scalar)]
        sizes = _broadcast_sizes(result.shape, tensors)
        nodes = [v if isinstance(v, Scalar) else self._broadcast(self._lazy(v), result.shape, sizes).node
                 for v in operands]
        value = Lazy(Apply(op.name, tuple(nodes), result.dtype, dict(op.attributes)), result.shape, sizes, result.dtype)
        return value if op.name in _EXACT_IN_RESULT_TYPE else rounded(value)

    def _scalar_op(self, op: Operation, operands: list[EnvValue]) -> Scalar:
        """An elementwise op on scalars (symbolic-size arithmetic): computed once, at function scope."""
        if not all(isinstance(v, Scalar) for v in operands):
            raise UnsupportedError("scalar result from tensor operands")
        dtype = op.results[0].type
        ssa = scalar_ops.lower(self.w, op.name, [(v.ssa, v.dtype) for v in operands], dtype, dict(op.attributes))
        if is_narrow_float(dtype) and op.name not in _EXACT_IN_RESULT_TYPE:
            ssa = scalar_ops.round_to(self.w, ssa, dtype.name)
        return Scalar(ssa, dtype)

    def _broadcast(self, value: Lazy, shape: tuple[int | None, ...], sizes: tuple[Size, ...]) -> Lazy:
        """NumPy broadcasting of `value` to `shape` (its trailing dims align with shape's)."""
        offset = len(shape) - value.rank
        dims: Map = tuple(None if d == 1 and shape[offset + k] != 1 else offset + k for k, d in enumerate(value.shape))
        return reindex(value, dims, shape, sizes)

    def _lazy(self, value: EnvValue) -> Lazy:
        if isinstance(value, Lazy):
            return value
        raise UnsupportedError(f"a scalar ({value.dtype}) used where a tensor is expected")

    # ------------------------------------------------------------------ constants and generators
    def _constant(self, op: Operation, operands: list[EnvValue]) -> EnvValue:
        value = op.attributes["value"]
        result = op.results[0].type
        if isinstance(result, TensorType):
            if not isinstance(value, DenseAttr):
                raise UnsupportedError("only dense literal tensors are lowered (resources are kernel inputs)")
            splat = _splat(value.value)
            if splat is not None:
                node = self._typed_constant(splat, result.dtype)
                return Lazy(node, result.shape, result.shape, result.dtype)
            element = storage_type(result.dtype)
            ssa = self.w.emit(f"arith.constant {format_attribute(value)}", "k")
            return leaf(Tensor(ssa, result.shape, element, result.shape), result.dtype)
        return self._typed_constant(value, result)

    def _typed_constant(self, value: float | int | bool, dtype: ScalarType) -> Scalar:
        """A constant of `dtype` in its compute type: f16/bf16 values are rounded to the
        type first (0.1 as a bf16 constant is 0.10009765625, as in eager torch)."""
        if dtype.is_float:
            value = torch.tensor(value, dtype=dtype.torch_dtype).item()
        return Scalar(self.w.constant(value, compute_type(dtype)), dtype)

    def _full(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        result = self._result_type(op)
        node = self._typed_constant(op.attributes["value"], result.dtype)
        return Lazy(node, result.shape, self._sized(op, operands), result.dtype)

    def _iota(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        result = self._result_type(op)
        start, step = op.attributes["start"], op.attributes["step"]
        wide = I64 if isinstance(start, int) and isinstance(step, int) else F64  # as the reference: exact, then cast
        position = Index(0) if wide == I64 else Apply("ft.cast", (Index(0),), F64)
        scaled = Apply("ft.mul", (position, Scalar(self.w.constant(step, wide.name), wide)), wide)
        value = Apply("ft.add", (scaled, Scalar(self.w.constant(start, wide.name), wide)), wide)
        node = Apply("ft.cast", (value,), result.dtype)
        return Lazy(node, result.shape, self._sized(op, operands), result.dtype)

    def _sized(self, op: Operation, size_operands: list[EnvValue]) -> tuple[Size, ...]:
        """Sizes of a sized op's result: static dims from the type, `?` dims from the i64
        operands; in row blocks, a row value's dim 0 is the block's row count."""
        dynamic = iter(size_operands)
        sizes = [d if d is not None else self._as_index(next(dynamic)) for d in op.results[0].type.shape]
        if self.block is not None and id(op.results[0]) in self.rows:
            sizes[0] = self.block[1]
        return tuple(sizes)

    def _as_index(self, value: EnvValue) -> str:
        if not isinstance(value, Scalar):
            raise UnsupportedError("a size operand must be a scalar")
        return self.w.emit(f"arith.index_cast {value.ssa} : {value.dtype.name} to index", "s")

    def _dim(self, op: Operation, operands: list[EnvValue]) -> Scalar:
        value = self._lazy(operands[0])
        size = value.sizes[op.attributes["dim"] % value.rank]
        if isinstance(size, int):
            return Scalar(self.w.constant(size, "i64"), I64)
        return Scalar(self.w.emit(f"arith.index_cast {size} : index to i64", "s"), I64)

    # ------------------------------------------------------------------ views
    def _transpose(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        value = self._lazy(operands[0])
        perm = op.attributes["perm"]
        inverse = [0] * len(perm)
        for new_dim, old_dim in enumerate(perm):
            inverse[old_dim] = new_dim
        shape = tuple(value.shape[p] for p in perm)
        sizes = tuple(value.sizes[p] for p in perm)
        return reindex(value, tuple(inverse), shape, sizes)

    def _broadcast_to(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        result = self._result_type(op)
        return self._broadcast(self._lazy(operands[0]), result.shape, self._sized(op, operands[1:]))

    def _reshape(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        result = self._result_type(op)
        value = self._lazy(operands[0])
        sizes = self._sized(op, operands[1:])
        unit_dims = unit_dim_map(value.shape, result.shape)
        if unit_dims is not None:
            return reindex(value, unit_dims, result.shape, sizes)
        tensor = self._stored(value)
        if not tensor.contiguous:  # collapsing a strided view would make bufferization copy it
            tensor = self._materialize([leaf(tensor, value.dtype)], [tensor.element], reuse=False)[0]
        return leaf(self._reshape_tensor(tensor, result.shape, sizes), value.dtype)

    def _stored(self, value: Lazy) -> Tensor:
        """A tensor holding `value` for a view to slice or reshape: the tensor it reads unchanged, in
        the type it is stored in (an f16/bf16 input is not widened into a copy), else `value`
        computed into a new tensor of its compute type."""
        read = as_tensor_read(value)
        return read if read is not None else self._materialize([value], [compute_type(value.dtype)])[0]

    def _reshape_tensor(self, tensor: Tensor, shape: tuple[int | None, ...], sizes: tuple[Size, ...]) -> Tensor:
        """Row-major reshape as views: collapse to 1-d, then expand (no copy after bufferization)."""
        numel = math.prod(tensor.shape) if None not in tensor.shape else None
        target_numel = math.prod(shape) if None not in shape else None
        flat = tensor.ssa
        if tensor.rank != 1:
            groups = "[[" + ", ".join(str(i) for i in range(tensor.rank)) + "]]"
            flat = self.w.emit(f"tensor.collapse_shape {tensor.ssa} {groups} : "
                               f"{tensor_type(tensor.shape, tensor.element)} into "
                               f"{tensor_type((numel,), tensor.element)}")
        # expand_shape wants a static source for a static result and a dynamic one otherwise.
        flat = self._cast_shape(flat, (numel,), (target_numel,), tensor.element)
        if len(shape) == 1:
            return Tensor(flat, shape, tensor.element, sizes)
        groups = "[[" + ", ".join(str(i) for i in range(len(shape))) + "]]"
        output_shape = ", ".join(str(s) for s in sizes)
        ssa = self.w.emit(f"tensor.expand_shape {flat} {groups} output_shape [{output_shape}] : "
                          f"{tensor_type((target_numel,), tensor.element)} into {tensor_type(shape, tensor.element)}")
        return Tensor(ssa, shape, tensor.element, sizes)

    def _cast_shape(self, ssa: str, shape: tuple[int | None, ...], target: tuple[int | None, ...],
                    element: str) -> str:
        """tensor.cast between static and dynamic spellings of one shape."""
        if shape == target:
            return ssa
        return self.w.emit(f"tensor.cast {ssa} : {tensor_type(shape, element)} to {tensor_type(target, element)}")

    def _slice(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        value = self._lazy(operands[0])
        result = self._result_type(op)
        tensor = self._stored(value)
        dim = op.attributes["dim"] % tensor.rank
        start, length = self._slice_bounds(tensor.sizes[dim], op.attributes["start"], op.attributes["end"],
                                           op.attributes["step"])
        offsets = ["0"] * tensor.rank
        offsets[dim] = str(start)
        sizes = list(tensor.sizes)
        sizes[dim] = length
        strides = ["1"] * tensor.rank
        strides[dim] = str(op.attributes["step"])
        ssa = self.w.emit(f"tensor.extract_slice {tensor.ssa}[{', '.join(offsets)}] [{', '.join(map(str, sizes))}] "
                          f"[{', '.join(strides)}] : {tensor_type(tensor.shape, tensor.element)} to "
                          f"{tensor_type(result.shape, tensor.element)}")
        # Row-major: a step-1 slice stays dense when every dim before the sliced one has size 1.
        dense = tensor.contiguous and op.attributes["step"] == 1 and all(d == 1 for d in tensor.shape[:dim])
        return leaf(Tensor(ssa, result.shape, tensor.element, tuple(sizes), dense), value.dtype)

    def _slice_bounds(self, size: Size, start: int, end: int, step: int) -> tuple[Size, Size]:
        """Python slice semantics (negative indices count from the end, bounds clamped)."""
        if isinstance(size, int):
            first, last, _ = slice(start, end, step).indices(size)
            return first, len(range(first, last, step))
        first = self._clamped_index(size, start)
        last = self._clamped_index(size, end)
        span = self.w.emit(f"arith.subi {last}, {first} : index")
        rounded = self.w.emit(f"arith.addi {span}, {self.w.index(step - 1)} : index")
        count = self.w.emit(f"arith.divsi {rounded}, {self.w.index(step)} : index")
        return first, self.w.emit(f"arith.maxsi {count}, {self.w.index(0)} : index")

    def _clamped_index(self, size: str, index: int) -> str:
        if index < 0:
            shifted = self.w.emit(f"arith.addi {size}, {self.w.index(index)} : index")
            return self.w.emit(f"arith.maxsi {shifted}, {self.w.index(0)} : index")
        return self.w.emit(f"arith.minsi {size}, {self.w.index(index)} : index")

    # ------------------------------------------------------------------ concatenation
    def _concat(self, op: Operation, operands: list[EnvValue]) -> Joined:
        result = self._result_type(op)
        pieces = tuple(self._lazy(v) for v in operands)
        dim = op.attributes["dim"] % result.rank
        sizes: list[Size] = [d if d is not None else pieces[0].sizes[k] for k, d in enumerate(result.shape)]
        if result.shape[dim] is None:
            sizes[dim] = self._sum_sizes([piece.sizes[dim] for piece in pieces])
        return Joined(pieces, dim, result.shape, tuple(sizes), result.dtype)

    def _join(self, value: Joined, element: str) -> Tensor:
        """`value` computed into a new (kernel-local) tensor of `element`: each piece by a
        loop nest of its own, writing its slice of the tensor."""
        joined = self._empty(value.shape, value.sizes, element)
        whole = tensor_type(value.shape, element)
        for piece, offsets, sizes in self._windows(value):
            window = f"[{_comma_list(offsets)}] [{_comma_list(sizes)}] [{_comma_list([1] * len(sizes))}]"
            shape = tuple(size if isinstance(size, int) else None for size in sizes)
            # The loop writes into the slice itself: a loop into a new tensor could be merged (cse)
            # with one computing the same piece as a result, which would then be copied.
            slot = self.w.emit(f"tensor.extract_slice {joined.ssa}{window} : {whole} to {tensor_type(shape, element)}")
            computed = self._compute_into([piece], [Tensor(slot, shape, element, sizes)])[0]
            ssa = self.w.emit(f"tensor.insert_slice {computed.ssa} into {joined.ssa}{window} : "
                              f"{tensor_type(shape, element)} into {whole}")
            joined = Tensor(ssa, value.shape, element, value.sizes)
        return joined

    def _windows(self, value: Joined) -> list[tuple[Lazy, list[Size], tuple[Size, ...]]]:
        """Each piece of a concatenation with the offsets and sizes of its slice of the result."""
        windows = []
        offsets: list[Size] = [0] * len(value.shape)
        for piece in value.pieces:
            sizes = tuple(piece.sizes[k] if k == value.dim else size for k, size in enumerate(value.sizes))
            windows.append((piece, list(offsets), sizes))
            offsets[value.dim] = self._sum_sizes([offsets[value.dim], sizes[value.dim]])
        return windows

    def _sum_sizes(self, sizes: Sequence[Size]) -> Size:
        """The sum of sizes: an int when all are static, else an `index` SSA value."""
        dynamic = [size for size in sizes if not isinstance(size, int)]
        static = sum(size for size in sizes if isinstance(size, int))
        if not dynamic:
            return static
        total = dynamic[0] if static == 0 else self.w.emit(f"arith.addi {dynamic[0]}, {self.w.index(static)} : index")
        for size in dynamic[1:]:
            total = self.w.emit(f"arith.addi {total}, {size} : index")
        return total

    # ------------------------------------------------------------------ reductions
    def _reduction(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        value = self._lazy(operands[0])
        result = self._result_type(op)
        dims = tuple(sorted({d % max(value.rank, 1) for d in op.attributes["dims"]} or range(value.rank)))
        kind = op.name.removeprefix("ft.")
        if kind == "mean":
            reduced = self._mean(value, dims)
        elif kind == "var":
            reduced = self._variance(value, dims, op.attributes.get("correction", 1))
        else:
            source = value if kind in ("any", "all") else _cast_to(value, result.dtype)
            reduced = leaf(self._reduce(source, dims, kind, result.dtype), result.dtype)
        if kind not in ("amax", "amin"):  # those are one of the values, already of their type
            reduced = rounded(reduced)
        return self._keepdim(reduced, value, dims, result) if op.attributes["keepdim"] else reduced

    def _keepdim(self, reduced: Lazy, source: Lazy, dims: tuple[int, ...], result: TensorType) -> Lazy:
        kept = tuple(k for k in range(source.rank) if k not in dims)
        sizes = tuple(1 if k in dims else source.sizes[k] for k in range(source.rank))
        return reindex(reduced, kept, result.shape, sizes)

    def _reduce(self, value: Lazy, dims: tuple[int, ...], kind: str, dtype: ScalarType) -> Tensor:
        """One linalg.generic reducing `value` over `dims` with `kind` (sum, prod, amax, amin, any, all)."""
        t = compute_type(dtype)
        is_float = dtype.is_float
        identity_value, combine = _REDUCERS[kind].start_and_combine(t, is_float)
        kept = tuple(k for k in range(value.rank) if k not in dims)
        init = self._filled(tuple(value.shape[k] for k in kept), tuple(value.sizes[k] for k in kept), t,
                            identity_value)

        def body(x: str, acc: str) -> str:
            if kind in ("any", "all"):
                x = scalar_ops.to_bool(self.w, x, value.dtype)
            return self.w.emit(combine.format(x=x, acc=acc, t=t))

        return self._generic([value], value.shape, dims, [init], lambda xs, accs: [body(xs[0], accs[0])])[0]

    def _sum_keeping_values(self, value: Lazy, dim: int) -> tuple[Tensor, Tensor]:
        """`value` computed into a tensor and summed over `dim`, in one loop nest (softmax's
        exp pass: each exp is computed once, stored and added up)."""
        t = compute_type(value.dtype)
        kept = tuple(k for k in range(value.rank) if k != dim)
        values = self._empty(value.shape, value.sizes, t)
        total = self._filled(tuple(value.shape[k] for k in kept), tuple(value.sizes[k] for k in kept), t, 0.0)

        def body(xs: list[str], accs: list[str]) -> list[str]:
            return [xs[0], self.w.emit(f"arith.addf {xs[0]}, {accs[1]} fastmath<reassoc> : {t}")]

        computed, summed = self._generic([value], value.shape, (dim,), [values, total], body,
                                         [identity(value.rank), kept])
        return computed, summed

    def _filled(self, shape: tuple[int | None, ...], sizes: tuple[Size, ...], element: str,
                value: float | int | bool) -> Tensor:
        empty = self._empty(shape, sizes, element)
        ssa = self.w.emit(f"linalg.fill ins({self.w.constant(value, element)} : {element}) outs({empty.ssa} : "
                          f"{tensor_type(shape, element)}) -> {tensor_type(shape, element)}")
        return Tensor(ssa, shape, element, sizes)

    def _empty(self, shape: tuple[int | None, ...], sizes: tuple[Size, ...], element: str) -> Tensor:
        dynamic = ", ".join(str(s) for d, s in zip(shape, sizes) if d is None)
        ssa = self.w.emit(f"tensor.empty({dynamic}) : {tensor_type(shape, element)}", "e")
        return Tensor(ssa, shape, element, sizes)

    def _mean(self, value: Lazy, dims: tuple[int, ...]) -> Lazy:
        total = leaf(self._reduce(value, dims, "sum", value.dtype), value.dtype)
        return _divide(total, self._count(value, dims, value.dtype))

    def _count(self, value: Lazy, dims: tuple[int, ...], dtype: ScalarType, correction: float = 0) -> Scalar:
        """The number of reduced elements (minus `correction`, at least 0) as a `dtype` scalar."""
        t = compute_type(dtype)
        static = math.prod(value.sizes[d] for d in dims if isinstance(value.sizes[d], int))
        count = self.w.index(static)
        for d in dims:
            if not isinstance(value.sizes[d], int):
                count = self.w.emit(f"arith.muli {count}, {value.sizes[d]} : index")
        as_int = self.w.emit(f"arith.index_cast {count} : index to i64")
        as_float = self.w.emit(f"arith.sitofp {as_int} : i64 to {t}")
        if correction:
            as_float = self.w.emit(f"arith.subf {as_float}, {self.w.constant(correction, t)} : {t}")
            as_float = self.w.emit(f"arith.maximumf {as_float}, {self.w.constant(0.0, t)} : {t}")
        return Scalar(as_float, dtype)

    def _variance(self, value: Lazy, dims: tuple[int, ...], correction: float) -> Lazy:
        kept = tuple(k for k in range(value.rank) if k not in dims)
        mean = reindex(self._materialized(self._mean(value, dims)), kept, value.shape, value.sizes)
        centered = Apply("ft.sub", (value.node, mean.node), value.dtype)
        square = Lazy(Apply("ft.mul", (centered, centered), value.dtype), value.shape, value.sizes, value.dtype)
        total = leaf(self._reduce(square, dims, "sum", value.dtype), value.dtype)
        return _divide(total, self._count(value, dims, value.dtype, correction))

    def _materialized(self, value: Lazy) -> Lazy:
        """`value` computed into a tensor (in its compute type), read back lazily."""
        return leaf(self._materialize([value], [compute_type(value.dtype)])[0], value.dtype)

    def _arg_reduction(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        value = self._lazy(operands[0])
        result = self._result_type(op)
        dim = op.attributes["dim"] % max(value.rank, 1)
        t = compute_type(value.dtype)
        is_max = op.name == "ft.argmax"
        kept = tuple(k for k in range(value.rank) if k != dim)
        shape, sizes = tuple(value.shape[k] for k in kept), tuple(value.sizes[k] for k in kept)
        start = (-math.inf if is_max else math.inf) if value.dtype.is_float else _int_limit(t, lowest=is_max)
        inits = [self._filled(shape, sizes, t, start), self._filled(shape, sizes, "i64", 0)]

        def body(xs: list[str], accs: list[str]) -> list[str]:
            x, (best, best_index) = xs[0], accs
            take = self._improves(x, best, t, value.dtype.is_float, is_max)
            position = self.w.emit(f"linalg.index {dim} : index")
            index = self.w.emit(f"arith.index_cast {position} : index to i64")
            return [self.w.emit(f"arith.select {take}, {x}, {best} : {t}"),
                    self.w.emit(f"arith.select {take}, {index}, {best_index} : i64")]

        reduced = leaf(self._generic([value], value.shape, (dim,), inits, body)[1], I64)
        return self._keepdim(reduced, value, (dim,), result) if op.attributes["keepdim"] else reduced

    def _improves(self, x: str, best: str, t: str, is_float: bool, is_max: bool) -> str:
        """Whether x replaces best: strictly better (so the first occurrence wins), or the
        first NaN (torch's argmax/argmin treat NaN as the extreme)."""
        if not is_float:
            signed = "u" if t == "i1" else "s"  # i1 true is -1 as a signed number
            return self.w.emit(f"arith.cmpi {signed}{'gt' if is_max else 'lt'}, {x}, {best} : {t}")
        better = self.w.emit(f"arith.cmpf {'ogt' if is_max else 'olt'}, {x}, {best} : {t}")
        x_nan = self.w.emit(f"arith.cmpf uno, {x}, {x} : {t}")
        best_ordered = self.w.emit(f"arith.cmpf ord, {best}, {best} : {t}")
        first_nan = self.w.emit(f"arith.andi {x_nan}, {best_ordered} : i1")
        return self.w.emit(f"arith.ori {better}, {first_nan} : i1")

    def _softmax(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        """softmax or log_softmax, computed in f32 for f16/bf16 and rounded to its type once, as torch does."""
        return rounded(self._softmax_unrounded(op, operands))

    def _softmax_unrounded(self, op: Operation, operands: list[EnvValue]) -> Lazy:
        result = self._result_type(op)
        x = _cast_to(self._lazy(operands[0]), result.dtype)
        dim = op.attributes["dim"] % x.rank
        kept = tuple(k for k in range(x.rank) if k != dim)

        def broadcast_back(reduced: Tensor) -> Node:
            return reindex(leaf(reduced, result.dtype), kept, x.shape, x.sizes).node

        maximum = broadcast_back(self._reduce(x, (dim,), "amax", result.dtype))
        shifted = Apply("ft.sub", (x.node, maximum), result.dtype)
        exp = Lazy(Apply("ft.exp", (shifted,), result.dtype), x.shape, x.sizes, result.dtype)
        if op.name == "ft.log_softmax":
            total = broadcast_back(self._reduce(exp, (dim,), "sum", result.dtype))
            node: Node = Apply("ft.sub", (shifted, Apply("ft.log", (total,), result.dtype)), result.dtype)
            return Lazy(node, x.shape, x.sizes, result.dtype)
        if self.block is None:  # recompute exp rather than write and re-read a whole-tensor temporary
            total = broadcast_back(self._reduce(exp, (dim,), "sum", result.dtype))
            return Lazy(Apply("ft.div", (exp.node, total), result.dtype), x.shape, x.sizes, result.dtype)
        # In a row block, exp is computed once into a cache-resident buffer while summing,
        # then scaled by the row's reciprocal (a multiply, not a divide, per element).
        values, total = self._sum_keeping_values(exp, dim)
        sums = leaf(total, result.dtype)
        reciprocals = self._materialize([Lazy(Apply("ft.reciprocal", (sums.node,), result.dtype), sums.shape,
                                              sums.sizes, result.dtype)], [total.element])[0]
        node = Apply("ft.mul", (leaf(values, result.dtype).node, broadcast_back(reciprocals)), result.dtype)
        return Lazy(node, x.shape, x.sizes, result.dtype)

    # ------------------------------------------------------------------ loop nests
    def _materialize(self, values: list[Lazy], elements: list[str], reuse: bool = True) -> list[Tensor]:
        """Compute `values` (one iteration space) into new tensors of `elements`, in one loop nest.

        reuse: a value that only reads a tensor is that tensor (no loop).  Outputs pass False:
        their loop writes the output buffer in place, where copying a strided view into it
        would need MLIR's C runner library (`memrefCopy`), which the wheel does not ship."""
        if reuse and len(values) == 1 and (read := as_tensor_read(values[0])) is not None \
                and read.element == elements[0]:
            return [read]
        shape, sizes = values[0].shape, values[0].sizes
        return self._compute_into(values, [self._empty(shape, sizes, element) for element in elements])

    def _compute_into(self, values: list[Lazy], inits: list[Tensor]) -> list[Tensor]:
        """Compute `values` (one iteration space) into `inits` (tensors of that shape), in one loop nest."""
        values = [_without_rounding_to(value, init.element) for value, init in zip(values, inits)]

        def body(xs: list[str], accs: list[str]) -> list[str]:
            return [self._store_cast(x, compute_type(v.dtype), t.element) for x, v, t in zip(xs, values, inits)]

        return self._generic(values, values[0].shape, (), inits, body)

    def _generic(self, values: list[Lazy], shape: tuple[int | None, ...], reduced: tuple[int, ...],
                 inits: list[Tensor], body: Callable[[list[str], list[str]], list[str]],
                 init_maps: list[Map] | None = None) -> list[Tensor]:
        """A linalg.generic over `shape` evaluating `values`' DAGs; `reduced` dims iterate
        as reductions.  `body(values, accumulators)` returns what each output yields.  Each
        output is indexed by the kept dims unless `init_maps` says otherwise."""
        w = self.w
        rank = len(shape)
        kept = tuple(k for k in range(rank) if k not in reduced)
        init_maps = init_maps or [kept] * len(inits)
        reads = leaves([v.node for v in values])
        inputs = [(r.tensor, r.map) for r in reads]
        covered = {e for _, m in [*inputs, *zip(inits, init_maps)] for e in m if e is not None}
        if not set(range(rank)) <= covered:
            # linalg infers loop bounds from operand shapes: give every loop a tensor spanning it.
            inputs.append((self._empty(shape, values[0].sizes, "i1"), identity(rank)))
        maps = [_affine_map(rank, m) for _, m in inputs] + [_affine_map(rank, m) for m in init_maps]
        iterators = ", ".join('"reduction"' if k in reduced else '"parallel"' for k in range(rank))
        results = w.fresh("g")
        names = [f"{results}#{i}" for i in range(len(inits))] if len(inits) > 1 else [results]
        ins = ""
        if inputs:
            ins = (f" ins({', '.join(t.ssa for t, _ in inputs)} : "
                   f"{', '.join(tensor_type(t.shape, t.element) for t, _ in inputs)})")
        outs = ", ".join(t.ssa for t in inits)
        out_types = ", ".join(tensor_type(t.shape, t.element) for t in inits)
        count = f":{len(inits)}" if len(inits) > 1 else ""
        w.line(f"{results}{count} = linalg.generic {{indexing_maps = [{', '.join(maps)}], "
               f"iterator_types = [{iterators}]}}{ins} outs({outs} : {out_types}) {{")
        arg_names = [w.fresh("x") for _ in inputs]
        acc_names = [w.fresh("acc") for _ in inits]
        block_args = [f"{n}: {t.element}" for n, (t, _) in zip(arg_names, inputs)]
        block_args += [f"{n}: {t.element}" for n, t in zip(acc_names, inits)]
        w.line(f"^bb0({', '.join(block_args)}):")
        w.depth += 1
        read_names = {(r.tensor.ssa, r.map): n for r, n in zip(reads, arg_names)}
        computed = self._evaluate([v.node for v in values], read_names)
        yielded = body(computed, acc_names)
        w.line(f"linalg.yield {', '.join(yielded)} : {', '.join(t.element for t in inits)}")
        w.depth -= 1
        result_types = ", ".join(tensor_type(t.shape, t.element) for t in inits)
        w.line(f"}} -> ({result_types})" if len(inits) > 1 else f"}} -> {result_types}")
        return [Tensor(n, t.shape, t.element, t.sizes) for n, t in zip(names, inits)]

    def _evaluate(self, roots: list[Node], read_names: dict[tuple[str, Map], str]) -> list[str]:
        """Emit the scalar code of a DAG (each shared node once); returns the roots' SSA names."""
        memo: dict[int, str] = {}

        def visit(node: Node) -> str:
            if id(node) in memo:
                return memo[id(node)]
            if isinstance(node, Leaf):
                ssa = self._load_cast(read_names[(node.tensor.ssa, node.map)], node.tensor.element,
                                      compute_type(node.dtype))
            elif isinstance(node, Scalar):
                ssa = node.ssa
            elif isinstance(node, Index):
                ssa = self.w.constant(0, "i64") if node.dim is None else self.w.emit(
                    f"arith.index_cast {self.w.emit(f'linalg.index {node.dim} : index')} : index to i64")
            elif isinstance(node, Rounded):
                ssa = scalar_ops.round_to(self.w, visit(node.operand), node.dtype.name)
            else:
                operands = [(visit(o), o.dtype) for o in node.operands]
                ssa = scalar_ops.lower(self.w, node.name, operands, node.dtype, node.attrs)
            memo[id(node)] = ssa
            return ssa

        return [visit(r) for r in roots]

    def _load_cast(self, x: str, element: str, compute: str) -> str:
        return x if element == compute else scalar_ops.widen(self.w, x, element)

    def _store_cast(self, x: str, compute: str, element: str) -> str:
        return x if element == compute else scalar_ops.narrow(self.w, x, element)


# How each non-elementwise op is lowered (elementwise ops go through scalar_ops).
_HANDLERS: dict[str, Callable[[_KernelEmitter, Operation, list[EnvValue]], EnvValue]] = {
    "ft.constant": _KernelEmitter._constant, "ft.full": _KernelEmitter._full, "ft.iota": _KernelEmitter._iota,
    "ft.dim": _KernelEmitter._dim, "ft.transpose": _KernelEmitter._transpose,
    "ft.broadcast_to": _KernelEmitter._broadcast_to, "ft.reshape": _KernelEmitter._reshape,
    "ft.slice": _KernelEmitter._slice, "ft.concat": _KernelEmitter._concat,
    **{name: _KernelEmitter._reduction for name in REDUCTIONS},
    **{name: _KernelEmitter._arg_reduction for name in ARG_REDUCTIONS},
    **{name: _KernelEmitter._softmax for name in SOFTMAX},
}


# ---------------------------------------------------------------------- helpers
def _broadcast_sizes(shape: tuple[int | None, ...], operands: list[Lazy]) -> tuple[Size, ...]:
    """Runtime sizes of a broadcast result: static dims from its type, each `?` from an
    operand that has that dim dynamic too (all such operands agree, see the module doc)."""
    sizes: list[Size] = []
    for k, d in enumerate(shape):
        if d is not None:
            sizes.append(d)
            continue
        from_right = len(shape) - k
        source = next(v.sizes[v.rank - from_right] for v in operands
                      if v.rank >= from_right and v.shape[v.rank - from_right] is None)
        sizes.append(source)
    return tuple(sizes)


def _comma_list(items: Sequence[object]) -> str:
    return ", ".join(map(str, items))


_EXPENSIVE = frozenset({"ft.exp", "ft.exp2", "ft.log", "ft.log2", "ft.log1p", "ft.expm1", "ft.tanh", "ft.erf",
                        "ft.sigmoid", "ft.silu", "ft.gelu", "ft.pow", "ft.sin", "ft.cos", "ft.tan", "ft.atan",
                        "ft.atan2"})


def _expensive(root: Node) -> bool:
    """Whether the DAG computes a transcendental function."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Rounded):
            stack.append(node.operand)
        elif isinstance(node, Apply):
            if node.name in _EXPENSIVE:
                return True
            stack.extend(node.operands)
    return False


def _cast_to(value: Lazy, dtype: ScalarType) -> Lazy:
    if value.dtype == dtype:
        return value
    return Lazy(Apply("ft.cast", (value.node,), dtype), value.shape, value.sizes, dtype)


def _without_rounding_to(value: Lazy, element: str) -> Lazy:
    """`value` without its last rounding when it is stored as the type it rounds to: the
    store rounds the same way, so rounding first would only cost time."""
    node = value.node
    if isinstance(node, Rounded) and node.dtype.name == element:
        return Lazy(node.operand, value.shape, value.sizes, value.dtype)
    return value


def _divide(value: Lazy, divisor: Scalar) -> Lazy:
    return Lazy(Apply("ft.div", (value.node, divisor), value.dtype), value.shape, value.sizes, value.dtype)


def _splat(t: torch.Tensor) -> float | int | bool | None:
    """The single value of a constant whose elements are all equal, else None."""
    if t.numel() == 0:
        return None
    flat = t.reshape(-1)
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        return None
    return flat[0].item()


def _int_limit(mlir_type: str, lowest: bool) -> int | bool:
    if mlir_type == "i1":
        return not lowest
    bits = int(mlir_type[1:])
    return -(1 << (bits - 1)) if lowest else (1 << (bits - 1)) - 1


def _affine_map(rank: int, entries: Sequence[int | None]) -> str:
    dims = ", ".join(f"d{k}" for k in range(rank))
    results = ", ".join("0" if e is None else f"d{e}" for e in entries)
    return f"affine_map<({dims}) -> ({results})>"


@dataclass(frozen=True)
class _Reducer:
    """How one reduction kind combines on floats, integers and i1, and where it starts."""

    float_op: str
    float_identity: float
    int_op: str
    int_identity: int | str  # "min"/"max": the type's limit
    bool_op: str
    bool_identity: bool

    def start_and_combine(self, t: str, is_float: bool) -> tuple[float | int | bool, str]:
        """The identity element and a `{x}, {acc}, {t}` template of the combining op."""
        if is_float:
            # reassoc lets LLVM vectorise the sum (partial sums per lane), as torch's kernels do.
            fastmath = " fastmath<reassoc>" if self.float_op in ("arith.addf", "arith.mulf") else ""
            return self.float_identity, f"{self.float_op} {{x}}, {{acc}}{fastmath} : {{t}}"
        if t == "i1":
            return self.bool_identity, f"{self.bool_op} {{x}}, {{acc}} : i1"
        identity_value = self.int_identity
        if isinstance(identity_value, str):
            identity_value = _int_limit(t, lowest=identity_value == "min")
        return identity_value, f"{self.int_op} {{x}}, {{acc}} : {{t}}"


_REDUCERS = {
    "sum": _Reducer("arith.addf", 0.0, "arith.addi", 0, "arith.ori", False),
    "prod": _Reducer("arith.mulf", 1.0, "arith.muli", 1, "arith.andi", True),
    "amax": _Reducer("arith.maximumf", -math.inf, "arith.maxsi", "min", "arith.ori", False),
    "amin": _Reducer("arith.minimumf", math.inf, "arith.minsi", "max", "arith.andi", True),
    "any": _Reducer("", 0.0, "", 0, "arith.ori", False),
    "all": _Reducer("", 0.0, "", 0, "arith.andi", True),
}
