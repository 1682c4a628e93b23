"""A compiled cpu kernel as a Python callable over torch tensors.

Arguments cross into the JIT-compiled code as MLIR memref descriptors (allocated pointer,
aligned pointer, offset, sizes, strides: int64 words) through the packed C interface.  Tensors
cross contiguous, except where a kernel declares its Strides: inputs it reads with their own
strides (views cost no copy) and outputs it writes in another memory order.
Output shapes come from the unit's FTIR ops run on meta tensors, once per input-shape
signature; that run also checks the one assumption the generated code makes about
dynamic dims (a `?` dim is never broadcast, see emitter.py), so a call that would read out
of bounds raises instead.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from flagtree.backends.cpu.emitter import KernelUnit
from flagtree.backends.cpu.host import host_cpu
from flagtree.errors import FlagtreeError
from flagtree.ir.core import Operation, Value
from flagtree.ir.opdef import ELEMENTWISE, has_trait, lookup
from flagtree.ir.ops._util import runtime_shape
from flagtree.ir.types import I64, TensorType
from flagtree.runtime.signatures import SignatureCache


class KernelCallError(FlagtreeError):
    """A kernel was called with arguments it was not compiled for."""


class CpuKernel:
    """Call with the unit's inputs (tensors; Python numbers for scalar inputs); returns its outputs.

    `launch(args, outputs)` writes into caller-allocated outputs instead (contiguous, or laid
    out as the kernel's Strides say).  Calls from several threads may run at once (each thread
    packs arguments in its own buffer)."""

    def __init__(self, unit: KernelUnit, entry: Any, engine: Any, label: str, rows: frozenset[int] | None,
                 work_items: WorkItems | None = None, strides: Strides | None = None,
                 worth_splitting: WorthSplitting | None = None):
        """rows: the unit's row values when the kernel was generated in row blocks
        (emitter.emit_kernel); it then takes the row range to compute after the outputs.
        work_items: for a kernel split into independent items of its own (attention: one per
        head and block of queries), their count for a call; it takes the item range instead.
        strides: the tensors the kernel takes with other strides than contiguous ones.
        worth_splitting: whether a call has work enough to split its items across cores (by
        default: PARALLEL_MIN_ELEMENTS elements in its operands)."""
        self.unit = unit
        self.label = label  # names the kernel in errors and launch plans
        self._entry = entry
        self._engine = engine  # owns the machine code `entry` points into
        self._rows = rows
        self._work_items = work_items or (_leading_rows if rows else None)
        self._arg_types = [a.type for a in unit.args]
        self._result_types: list[TensorType] = [r.type for r in unit.results]
        self._result_dtypes = [t.dtype.torch_dtype for t in self._result_types]
        row_range = [I64] * 2 if self._work_items else []
        self._layout = _ArgumentLayout([*self._arg_types, *self._result_types, *row_range])
        self._strides = strides or Strides()
        self._worth_splitting = worth_splitting or _many_elements
        self._strided_inputs = tuple(i in self._strides.inputs for i in range(len(self._arg_types)))
        self._launches: SignatureCache[_Launch] = SignatureCache()

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        args, launch = self._prepared(args)
        outputs = [torch.empty(shape, dtype=dtype) if strides is None else
                   torch.empty_strided(shape, strides, dtype=dtype)
                   for shape, strides, dtype in zip(launch.shapes, launch.output_strides, self._result_dtypes)]
        self._run(launch, [*args, *outputs])
        return outputs

    def launch(self, args: Sequence[Any], outputs: Sequence[torch.Tensor]) -> None:
        args, launch = self._prepared(args)
        for i, (out, shape, strides, dtype) in enumerate(zip(outputs, launch.shapes, launch.output_strides,
                                                              self._result_dtypes)):
            laid_out = out.is_contiguous() if strides is None else _laid_out(out, strides)
            if tuple(out.shape) != shape or out.dtype != dtype or not laid_out:
                layout = "contiguous" if strides is None else f"strides {strides}"
                raise KernelCallError(f"kernel {self.label}: output #{i} must be a {dtype} tensor of shape "
                                      f"{list(shape)} ({layout}), got {out.dtype} {list(out.shape)} "
                                      f"(strides {list(out.stride())})")
        self._run(launch, [*args, *outputs])

    def output_shapes(self, args: Sequence[Any]) -> list[tuple[int, ...]]:
        """The outputs' shapes for these inputs."""
        return self._prepared(args)[1].shapes

    def _run(self, launch: _Launch, values: list[Any]) -> None:
        """Call the kernel: once, or (row blocks with enough work) once per core on its rows."""
        if len(launch.words) == 1:
            self._layout.call(self._entry, launch.words[0], values)
            return
        first, *others = launch.words
        pending = [_thread_pool().submit(self._layout.call, self._entry, words, values) for words in others]
        self._layout.call(self._entry, first, values)
        for other in pending:
            other.result()

    def _prepared(self, args: Sequence[Any]) -> tuple[list[Any], _Launch]:
        """The arguments as the kernel reads them, and how to call it on them.  Tensors it cannot
        read are copied: non-contiguous ones, or for inputs it takes strided, those whose innermost
        stride is not 1.  A kernel with strided inputs keys its launches by the inputs' strides too
        (the launch says which to copy), so a call costs one pass over its arguments."""
        if len(args) != len(self._arg_types):
            raise KernelCallError(f"kernel {self.label} takes {len(self._arg_types)} arguments, got {len(args)}")
        if not self._strides.inputs:
            args = [a.contiguous() if isinstance(a, torch.Tensor) and not a.is_contiguous() else a for a in args]
            return args, self._launch_for(args, tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a
                                                      for a in args))
        signature = tuple((a.shape, a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)
        launch = self._launches.get(signature)
        copies = launch.copies if launch is not None else self._copies(args)
        if copies:
            args = [a.contiguous() if copy else a for a, copy in zip(args, copies)]
        return args, launch or self._launch_for(args, signature, copies)

    def _copies(self, args: Sequence[Any]) -> tuple[bool, ...]:
        """Which arguments of a kernel with strided inputs must be copied (see _prepared); () for none."""
        copies = tuple(isinstance(a, torch.Tensor) and not (_unit_innermost(a) if strided else a.is_contiguous())
                       for a, strided in zip(args, self._strided_inputs))
        return copies if any(copies) else ()

    def _launch_for(self, args: Sequence[Any], signature: tuple, copies: tuple[bool, ...] = ()) -> _Launch:
        """How to call the kernel on these inputs; the first call with an input signature
        (shapes, dtypes, scalar values, strides of strided inputs) checks the arguments and infers
        the output shapes."""
        launch = self._launches.get(signature)
        if launch is None:
            self._check(args)
            shapes = self._infer_shapes(args)
            row_ranges = self._row_ranges(args, shapes)
            output_strides = [_ordered_strides(shape, self._strides.output_orders.get(i))
                              for i, shape in enumerate(shapes)]
            layouts = [self._input_layout(a, strided) for a, strided in zip(args, self._strided_inputs)]
            layouts += [(shape, strides or _contiguous_strides(shape))
                        for shape, strides in zip(shapes, output_strides)]
            words = [self._layout.pack([*layouts, *rows]) for rows in row_ranges or [()]]
            launch = self._launches[signature] = _Launch(shapes, output_strides, words, copies)
        return launch

    @staticmethod
    def _input_layout(arg: Any, strided: bool) -> Any:
        """An input as pack takes it: a tensor's sizes and strides, a scalar's value."""
        if not isinstance(arg, torch.Tensor):
            return arg
        shape = tuple(arg.shape)
        return shape, _normal_strides(arg) if strided else _contiguous_strides(shape)

    def _row_ranges(self, args: Sequence[Any], shapes: list[tuple[int, ...]]) -> list[tuple[int, int]] | None:
        """The row (or work item) range of each core's call, or None (a plain kernel)."""
        if self._work_items is None:
            return None
        items = self._work_items(args, shapes)
        parts = max(min(items, host_cpu().cores), 1) if self._worth_splitting(args, shapes) else 1
        bounds = [items * i // parts for i in range(parts + 1)]
        return list(itertools.pairwise(bounds))

    # ------------------------------------------------------------------ arguments
    def _check(self, args: Sequence[Any]) -> None:
        for i, (arg, t) in enumerate(zip(args, self._arg_types)):
            if not isinstance(t, TensorType):
                if not isinstance(arg, (int, float)):
                    raise KernelCallError(f"kernel {self.label}: argument #{i} must be a {t} number, got {arg!r}")
                continue
            if not isinstance(arg, torch.Tensor) or arg.dtype != t.dtype.torch_dtype or arg.dim() != t.rank:
                got = f"{arg.dtype} tensor of rank {arg.dim()}" if isinstance(arg, torch.Tensor) else repr(arg)
                raise KernelCallError(f"kernel {self.label}: argument #{i} must be a {t}, got {got}")
            if any(d is not None and d != n for d, n in zip(t.shape, arg.shape)):
                raise KernelCallError(f"kernel {self.label}: argument #{i} must be a {t}, got shape {list(arg.shape)}")

    # ------------------------------------------------------------------ shapes
    def _infer_shapes(self, args: Sequence[Any]) -> list[tuple[int, ...]]:
        env: dict[int, Any] = {}
        for arg, value in zip(self.unit.args, args):
            env[id(arg)] = torch.empty(value.shape, dtype=value.dtype, device="meta") \
                if isinstance(value, torch.Tensor) else value
        for op in self.unit.ops:
            operands = [env[id(v)] for v in op.operands]
            try:
                results = _meta_run(op, operands)
            except Exception as e:
                shapes = ", ".join(str(list(a.shape)) if isinstance(a, torch.Tensor) else repr(a) for a in args)
                raise KernelCallError(f"kernel {self.label} cannot run on inputs of shapes {shapes}: "
                                      f"{op.location}: '{op.name}' op: {e}") from e
            for result, value in zip(op.results, results):
                env[id(result)] = value
        shapes = [tuple(env[id(r)].shape) for r in self.unit.results]
        if self._rows:
            self._check_rows(env, shapes[0][0])
        return shapes

    def _check_rows(self, env: dict[int, Any], rows: int) -> None:
        """Row blocks slice every row value at the same rows: they must all have `rows` rows."""
        for value in [*self.unit.args, *(r for op in self.unit.ops for r in op.results)]:
            if id(value) in self._rows and env[id(value)].shape[0] != rows:
                raise KernelCallError(f"kernel {self.label}: a value of type {value.type} has "
                                      f"{env[id(value)].shape[0]} rows where the outputs have {rows}; the kernel "
                                      "computes row blocks and needs one row count")


# The number of independent work items of a call, from its arguments and output shapes.
WorkItems = Callable[[Sequence[Any], list[tuple[int, ...]]], int]


@dataclass(frozen=True)
class Strides:
    """The tensors a kernel takes with other strides than contiguous ones.

    inputs: positions of inputs read with their own strides (their memref types are
    `strided<[?, ..., ?, 1]>`: a view from the plan crosses without a copy; one whose innermost
    stride is not 1 is copied).  output_orders: output position → the order its dims are laid out
    in memory, outermost first (attention writes [B, H, S, D] as [B, S, H, D], so the usual
    permute and reshape after it are views); their memrefs are strided the same way."""

    inputs: frozenset[int] = frozenset()
    output_orders: dict[int, tuple[int, ...]] = field(default_factory=dict)


# Whether a call's work is worth splitting across cores, from its arguments and output shapes.
WorthSplitting = Callable[[Sequence[Any], list[tuple[int, ...]]], bool]


def _leading_rows(args: Sequence[Any], shapes: list[tuple[int, ...]]) -> int:
    """A row-block kernel's items: the rows of its outputs."""
    return shapes[0][0]


def _many_elements(args: Sequence[Any], shapes: list[tuple[int, ...]]) -> bool:
    """Whether the operands hold PARALLEL_MIN_ELEMENTS elements (work about linear in them)."""
    elements = sum(a.numel() for a in args if isinstance(a, torch.Tensor)) + sum(math.prod(s) for s in shapes)
    return elements >= PARALLEL_MIN_ELEMENTS


@dataclass(frozen=True)
class _Launch:
    """How one input signature runs: its output shapes, and the argument words
    (_ArgumentLayout.pack) of each call: one, or (row blocks with enough work) one per core,
    each with its range of rows."""

    shapes: list[tuple[int, ...]]
    output_strides: list[list[int] | None]  # None: contiguous (allocated with torch.empty)
    words: list[Any]
    copies: tuple[bool, ...]  # which arguments a kernel with strided inputs copies, () for none (CpuKernel._prepared)


class _ArgumentLayout:
    """Where each argument lives in the int64 buffer the packed C interface reads.

    A memref is its descriptor (allocated and aligned pointers, offset, sizes, strides)
    plus a slot holding the descriptor's address (the C interface takes memrefs by
    pointer); a scalar is one word.  The pointer array is fixed per buffer, and the sizes,
    strides and scalars per launch (`pack`), so a call copies those words in one move and
    writes only the data pointers: a few microseconds less per call than packing each value."""

    def __init__(self, types: list[Any]):
        self.starts: list[int] = []
        self.kinds: list[str] = []
        words = 0
        for t in types:
            self.starts.append(words)
            if isinstance(t, TensorType):
                self.kinds.append("tensor")
                words += 3 + 2 * t.rank
            else:
                self.kinds.append(t.name if t.name in ("f32", "f64") else "int")
                words += 1
        self.descriptor_words = words
        # (descriptor start, position among the values) of each tensor
        self.tensors = [(s, i) for i, (s, kind) in enumerate(zip(self.starts, self.kinds)) if kind == "tensor"]
        self.address_slots = {start: words + i for i, (start, _) in enumerate(self.tensors)}
        self.size = words + len(self.address_slots)
        self._local = threading.local()

    def pack(self, values: Sequence[Any]) -> Any:
        """The argument words of one launch, data pointers left 0: a tensor's descriptor from its
        (sizes, strides) given instead of the tensor, a scalar's word from its value."""
        words = (ctypes.c_int64 * self.descriptor_words)()
        for start, kind, value in zip(self.starts, self.kinds, values):
            if kind == "tensor":
                sizes, strides = value
                words[start + 3:start + 3 + 2 * len(sizes)] = (*sizes, *strides)
            else:
                words[start] = _scalar_word(value, kind)
        return words

    def call(self, entry: Any, words: Any, values: Sequence[Any]) -> None:
        """Call `entry` on `values` (the tensors the words were packed for; their scalars
        are in the words already)."""
        buffer, pointers = self._buffers()
        ctypes.memmove(buffer, words, 8 * self.descriptor_words)
        for start, position in self.tensors:
            buffer[start] = buffer[start + 1] = values[position].data_ptr()
        entry(pointers)

    def _buffers(self) -> tuple[Any, Any]:
        """This thread's buffer and pointer array (created on its first call)."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffer = (ctypes.c_int64 * self.size)()
            base = ctypes.addressof(buffer)
            for start, slot in self.address_slots.items():
                buffer[slot] = base + 8 * start
            pointers = (ctypes.c_void_p * len(self.starts))(
                *(base + 8 * self.address_slots.get(start, start) for start in self.starts))
            buffers = self._local.buffers = (buffer, pointers)
        return buffers


# Below this many elements a thread hand-off costs more than it saves: waking a pool thread and
# joining it takes 20-50 us from Python (measured on a 2-core VM, longer when the BLAS threads of
# a preceding matmul still spin), while an elementwise kernel computes ~3 elements a nanosecond.
PARALLEL_MIN_ELEMENTS = 1 << 20


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    # ctypes releases the GIL during the call, so kernel calls from these threads run in parallel.
    return ThreadPoolExecutor(max_workers=max(host_cpu().cores - 1, 1), thread_name_prefix="flagtree-cpu")


def _meta_run(op: Operation, operands: list[Any]) -> list[Any]:
    """The op's results on meta tensors (shapes only), checking the no-dynamic-broadcast rule."""
    result_types = [r.type for r in op.results]
    tensor_operands = [o for o in operands if isinstance(o, torch.Tensor)]
    if not tensor_operands and isinstance(result_types[0], TensorType):
        # Generators and literals: only the result's shape matters.
        t = result_types[0]
        return [torch.empty(runtime_shape(t, operands), dtype=t.dtype.torch_dtype, device="meta")]
    out = lookup(op.name).reference(operands, op.attributes, result_types)
    results = list(out) if isinstance(out, tuple) else [out]
    if has_trait(op, ELEMENTWISE) or op.name == "ft.broadcast_to":
        _check_no_dynamic_broadcast(op.operands, operands, results[0])
    if op.name in _EXACT_SHAPE_OPS:
        _check_exact_shapes(op, operands)
    return results


# Ops whose kernels read operands at indices taken from other operands' sizes (attention reads
# k and v at q's batch and at query head // group, gather_matmul x at each index entry's batch),
# so the call's shapes must satisfy the op's type rule exactly; the eager reference alone would
# accept some (it broadcasts batch dims).
_EXACT_SHAPE_OPS = frozenset({"ft.attention", "ft.gather_matmul"})


def _check_exact_shapes(op: Operation, operands: list[Any]) -> None:
    """The op's type inference on the operands' run-time shapes, which must succeed."""
    concrete = [Value(TensorType(tuple(x.shape), v.type.dtype)) for v, x in zip(op.operands, operands)]
    problem = lookup(op.name).infer(Operation(op.name, concrete, [], op.attributes))
    if isinstance(problem, str):
        raise ValueError(problem)


def _check_no_dynamic_broadcast(values: list[Value], operands: list[Any], result: Any) -> None:
    for value, operand in zip(values, operands):
        if not isinstance(value.type, TensorType):
            continue
        offset = result.dim() - operand.dim()
        for k, d in enumerate(value.type.shape):
            if d is None and operand.shape[k] != result.shape[offset + k]:
                raise ValueError(f"dynamic dim {k} of an operand ({operand.shape[k]}) is broadcast to "
                                 f"{result.shape[offset + k]}; compiled kernels require `?` dims not to "
                                 "broadcast (recompile with that dim static)")


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    """Row-major strides of `shape` in elements (what torch gives a contiguous tensor; a size-1
    dim's stride may differ there, but it only ever multiplies index 0)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _ordered_strides(shape: Sequence[int], order: tuple[int, ...] | None) -> list[int] | None:
    """The strides of a tensor of `shape` whose dims are laid out in `order` (None: contiguous)."""
    if order is None:
        return None
    strides = [0] * len(shape)
    for dim, stride in zip(order, _contiguous_strides([shape[d] for d in order])):
        strides[dim] = stride
    return strides


def _laid_out(tensor: torch.Tensor, strides: Sequence[int]) -> bool:
    """Whether `tensor` has these strides (in every dim of more than one element)."""
    return all(size <= 1 or a == b for a, b, size in zip(tensor.stride(), strides, tensor.shape))


def _unit_innermost(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 0 or tensor.stride(-1) == 1 or tensor.shape[-1] <= 1


def _normal_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's strides as a strided memref of it reads them: those of size-1 dims (which only
    ever multiply index 0, and which torch sets freely) as contiguous strides give them, the
    innermost 1."""
    contiguous = _contiguous_strides(tensor.shape)
    strides = [c if size <= 1 else s for s, c, size in zip(tensor.stride(), contiguous, tensor.shape)]
    if strides:
        strides[-1] = 1
    return tuple(strides)


def _scalar_word(value: Any, kind: str) -> int:
    """A scalar argument as the int64 word the packed interface reads (little-endian)."""
    if kind == "f64":
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    if kind == "f32":
        return struct.unpack("<i", struct.pack("<f", float(value)))[0]
    return int(value)
