"""Lower an FTIR function to a launch plan; shared by every codegen backend.

Each top-level op of the function becomes plan lines:

- ops the backend has a lowering for (`ft.fusion` regions, `ft.attention`, ...): whatever
  that lowering writes (kernel launches); an op it cannot generate code for raises
  `UnsupportedRegion` and runs through its reference implementation instead (a region op
  by op), counted in the plan's `fallback_ops` and logged once through the `flagtree` logger;
- `ft.matmul`: `torch.matmul` (BLAS / cuBLAS);
- `ft.index` with one 1-D integer index: `index_select(x, dim, index)` (whole-slice copies);
- `ft.dim`: `s0 = arg0.shape[1]`; `ft.full`: `torch.full(...)`;
- the views `ft.reshape`, `ft.transpose`, `ft.broadcast_to`: the tensor method their reference calls
  (`buf1 = buf0.reshape((256, 32))`), a few microseconds less per call than a reference call;
- every other op: a call to its reference implementation, bound as a readable global
  (`buf5 = ft_softmax(buf4, dim=-1)`), so any module runs; `ft.torch_call` ops, and fused
  ops (`ft.attention_grad`, ...) the backend has no kernel for, are counted as fallbacks.

Buffers are deleted (`del buf3`) right after their last use, as in Inductor's output code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flagtree.backends.reference.executor import run_block
from flagtree.errors import FlagtreeError
from flagtree.ir.attributes import DenseAttr, ResourceAttr
from flagtree.ir.core import Module, Operation, Value
from flagtree.ir.opdef import FUSED, has_trait, lookup
from flagtree.ir.ops.misc import fallback_name
from flagtree.ir.types import TensorType, Type
from flagtree.runtime.plan import DeviceConstant, LaunchPlan, PlanWriter

logger = logging.getLogger("flagtree")


class UnsupportedRegion(FlagtreeError):
    """A fusion region a backend cannot generate code for; the message says which op and why."""


# A backend's code generator for one op (an `ft.fusion`, an `ft.attention`, ...): it receives
# the op, the writer and the plan names of the op's operands, writes the launch lines and
# returns the plan names of the op's results.
OpLowering = Callable[[Operation, PlanWriter, list[str]], list[str]]


class ReferenceOp:
    """Calls one op's eager reference implementation from a plan.

    Attributes that print as Python literals are passed by the plan line as keywords
    (readable); the others (dense tensors, types) are held here.
    """

    def __init__(self, op: Operation, held_attributes: dict[str, Any]):
        opdef = lookup(op.name)
        if opdef is None or opdef.reference is None:
            raise FlagtreeError(f"{op.location}: '{op.name}' op has no reference implementation to run")
        self.op_name = op.name
        self.reference = opdef.reference
        self.attributes = held_attributes
        self.result_types: list[Type] = [r.type for r in op.results]

    def __call__(self, *operands: Any, **attributes: Any) -> Any:
        return self.reference(list(operands), {**self.attributes, **attributes}, self.result_types)


class ReferenceRegion:
    """Runs a fusion region op by op with eager torch (for regions a backend cannot compile)."""

    def __init__(self, op: Operation, resources: dict[str, torch.Tensor]):
        self.block = op.regions[0].block
        self.resources = resources

    def __call__(self, *operands: Any) -> list[Any]:
        return run_block(self.block, operands, self.resources)


def lower_function(
    module: Module,
    backend: str,
    lowerings: dict[str, OpLowering],
    function: str = "main",
    default_device: str = "cpu",
) -> LaunchPlan:
    """The launch plan of `@function`; `lowerings[op name]` writes the launches of those ops.

    default_device: where allocations go when the function takes no tensor argument.
    """
    return _Lowering(module, backend, lowerings, function, default_device).run()


class _Lowering:
    def __init__(self, module: Module, backend: str, lowerings: dict[str, OpLowering], function: str,
                 default_device: str):
        self.module = module
        self.block = module.function(function).regions[0].block
        self.writer = PlanWriter(backend, len(self.block.args), function)
        self.lowerings = lowerings
        self.default_device = default_device
        self.names: dict[int, str] = {}

    def run(self) -> LaunchPlan:
        for i, arg in enumerate(self.block.args):
            self.names[id(arg)] = self.writer.arg(i)
        self._write_device()
        last_use = self._last_uses()
        for index, op in enumerate(self.block.ops):
            if op.name == "func.return":
                return self.writer.build([self.names[id(v)] for v in op.operands])
            self._lower_op(op)
            dead = [self.names[id(v)] for v in _unique(op.operands)
                    if last_use[id(v)] == index and self._is_buffer(v)]
            if dead:
                self.writer.line(f"del {', '.join(dead)}")
        raise FlagtreeError(f"@{self.writer.function} has no func.return")

    def _write_device(self) -> None:
        """`device`: where the graph runs, that of its first tensor argument of rank > 0.  0-d
        tensors may live on the CPU beside device tensors (torch mixes them; Dynamo passes
        unspecialised Python floats that way), so they are moved to `device` first."""
        tensor_args = [i for i, a in enumerate(self.block.args) if isinstance(a.type, TensorType)]
        scalars = [i for i in tensor_args if self.block.args[i].type.rank == 0]
        placed = [i for i in tensor_args if i not in scalars] or tensor_args
        if placed:
            self.writer.line(f"device = {self.writer.arg(placed[0])}.device")
        else:
            self.writer.line(f"device = torch.device({self.default_device!r})")
        for i in scalars:
            self.writer.line(f"{self.writer.arg(i)} = {self.writer.arg(i)}.to(device)")
        self.writer.bind("torch", torch)

    def _last_uses(self) -> dict[int, float]:
        """The index of each value's last user; infinity for returned values (never deleted)."""
        last: dict[int, float] = {}
        returned = {id(v) for op in self.block.ops if op.name == "func.return" for v in op.operands}
        for index, op in enumerate(self.block.ops):
            for v in op.operands:
                last[id(v)] = math.inf if id(v) in returned else index
        return last

    def _is_buffer(self, value: Value) -> bool:
        return isinstance(value.type, TensorType) and self.names[id(value)].startswith("buf")

    def _lower_op(self, op: Operation) -> None:
        operands = [self.names[id(v)] for v in op.operands]
        if op.name in self.lowerings:
            results = self._lower_by_backend(op, operands)
        elif op.name == "ft.matmul":
            results = [self.writer.new_buffer()]
            self.writer.line(f"{results[0]} = torch.matmul({operands[0]}, {operands[1]})")
        elif op.name == "ft.index" and _selects_along_one_dim(op):
            results = [self._index_select(op, operands)]
        elif op.name == "ft.dim":
            results = [self.writer.size(f"{operands[0]}.shape[{op.attributes['dim']}]")]
        elif op.name == "ft.full":
            results = [self._full(op, operands)]
        elif op.name in _VIEW_METHODS:
            results = [self._view(op, operands)]
        elif op.name == "ft.constant":
            results = [self._constant(op)]
        else:
            results = self._reference_call(op, operands)
        for result, name in zip(op.results, results):
            self.names[id(result)] = name

    def _lower_by_backend(self, op: Operation, operands: list[str]) -> list[str]:
        try:
            return self.lowerings[op.name](op, self.writer, operands)
        except UnsupportedRegion as e:
            where = op.location
            logger.warning("flagtree %s backend: %s at %s runs in eager torch: %s",
                           self.writer.backend, op.name, where, e)
            self.writer.fallback_ops[f"{op.name} ({e})"] += 1
            self.writer.comment(f"{op.name} at {where} is not compiled: {e}")
            if op.name != "ft.fusion":
                return self._reference_call(op, operands)
            region = self.writer.bind("eager_region", ReferenceRegion(op, self.module.resources))
            return self._assign(op, f"{region}({', '.join(operands)})", unpack_list=True)

    def _full(self, op: Operation, operands: list[str]) -> str:
        result: TensorType = op.results[0].type
        name = self.writer.new_buffer()
        self.writer.line(f"{name} = torch.full({_result_shape(result, operands)}, "
                         f"{_python_literal(op.attributes['value'])}, dtype={result.dtype.torch_dtype}, device=device)")
        return name

    def _view(self, op: Operation, operands: list[str]) -> str:
        """`x.reshape(shape)`, `x.expand(shape)` or `x.permute(perm)`, as the op's reference computes it."""
        x, *sizes = operands
        shape = _shape_tuple([str(d) for d in op.attributes["perm"]]) if op.name == "ft.transpose" \
            else _result_shape(op.results[0].type, sizes)
        name = self.writer.new_buffer()
        self.writer.line(f"{name} = {x}.{_VIEW_METHODS[op.name]}({shape})")
        return name

    def _index_select(self, op: Operation, operands: list[str]) -> str:
        name = self.writer.new_buffer()
        callee = self.writer.bind("index_select", index_select)
        self.writer.line(f"{name} = {callee}({operands[0]}, {op.attributes['dims'][0]}, {operands[1]})")
        return name

    def _constant(self, op: Operation) -> str:
        value = op.attributes["value"]
        if isinstance(value, (DenseAttr, ResourceAttr)):
            tensor = value.value if isinstance(value, DenseAttr) else self._resource(op, value)
            constant = self.writer.bind(_constant_name(value), DeviceConstant(tensor))
            name = self.writer.new_buffer("const")
            self.writer.line(f"{name} = {constant}.on(device)")
            return name
        return _python_literal(value)

    def _resource(self, op: Operation, value: ResourceAttr) -> torch.Tensor:
        if value.name not in self.module.resources:
            raise FlagtreeError(f"{op.location}: 'ft.constant' op: resource '{value.name}' has no data bound; "
                                "bind it in Module.resources before compiling")
        return self.module.resources[value.name]

    def _reference_call(self, op: Operation, operands: list[str]) -> list[str]:
        if op.name == "ft.torch_call":
            self.writer.fallback_ops[fallback_name(op)] += 1
        elif has_trait(op, FUSED) and op.name not in self.lowerings:
            self.writer.fallback_ops[f"{op.name} (the {self.writer.backend} backend has no kernel for it)"] += 1
        shown = {k: v for k, v in op.attributes.items() if _is_literal(v)}
        held = {k: v for k, v in op.attributes.items() if k not in shown}
        callee = self.writer.bind(op.name.replace(".", "_"), ReferenceOp(op, held))
        arguments = [*operands, *(f"{k}={v!r}" for k, v in sorted(shown.items()))]
        call = f"{callee}({', '.join(arguments)})"
        creates_tensors = any(isinstance(r.type, TensorType) for r in op.results)
        if creates_tensors and not any(isinstance(v.type, TensorType) for v in op.operands):
            # generators (ft.iota, ...) build on the default device: make that the graph's (a
            # copy from the CPU would also break CUDA graph capture)
            return self._assign(op, call, unpack_list=False, prefix="with torch.device(device): ")
        return self._assign(op, call, unpack_list=False)

    def _assign(self, op: Operation, call: str, unpack_list: bool, prefix: str = "") -> list[str]:
        names = [self.writer.new_buffer() if isinstance(r.type, TensorType) else self.writer.new_buffer("s")
                 for r in op.results]
        if not names:
            self.writer.line(prefix + call)
        elif len(names) == 1 and not unpack_list:
            self.writer.line(f"{prefix}{names[0]} = {call}")
        else:
            self.writer.line(f"{prefix}{', '.join(names)}{',' if len(names) == 1 else ''} = {call}")
        return names


def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """`x[..., index, ...]` (aten.index) for a 1-D integer `index` at `dim`; negative entries count from the end.

    torch.index_select copies whole slices where aten.index copies element by element (about 10x
    faster on a CPU for an MoE's gathered expert weights `w[idx]`), but it rejects negative entries,
    so those are wrapped first; entries out of range either way still raise IndexError.
    """
    return torch.index_select(x, dim, torch.where(index < 0, index + x.shape[dim], index))


def _selects_along_one_dim(op: Operation) -> bool:
    """Whether an `ft.index` op indexes one dim with one 1-D integer tensor (not a mask)."""
    if len(op.operands) != 2:
        return False
    index = op.operands[1].type
    return isinstance(index, TensorType) and index.rank == 1 and index.dtype.name in ("i64", "i32")


def _unique(values: Sequence[Value]) -> list[Value]:
    seen: dict[int, Value] = {}
    for v in values:
        seen.setdefault(id(v), v)
    return list(seen.values())


# View ops the plan runs as the tensor method of the same name in their reference.
_VIEW_METHODS = {"ft.reshape": "reshape", "ft.transpose": "permute", "ft.broadcast_to": "expand"}


def _shape_tuple(dims: Sequence[str]) -> str:
    if not dims:
        return "()"
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _result_shape(result: TensorType, sizes: Sequence[str]) -> str:
    """The Python tuple of a sized op's result shape: static dims, then `sizes` for the `?` dims."""
    it = iter(sizes)
    return _shape_tuple([next(it) if d is None else str(d) for d in result.shape])


def _constant_name(value: DenseAttr | ResourceAttr) -> str:
    if isinstance(value, ResourceAttr):
        cleaned = "".join(c if c.isalnum() else "_" for c in value.name)
        return f"weight_{cleaned}"
    return "dense"


def _python_literal(value: int | float | bool) -> str:
    """Python source for a scalar attribute, inf and nan included."""
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    return repr(value)


def _is_literal(value: Any) -> bool:
    """Whether repr(value) is Python source that evaluates back to value."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_literal(v) for k, v in value.items())
    return False
