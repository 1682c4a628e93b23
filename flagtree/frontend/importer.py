"""Import an aten-level FX graph (what aot_autograd hands a compiler) into FTIR.

The graph becomes `func.func @main`: placeholders are its arguments, each node one or a
few FTIR ops (the mapping lives in `aten_mapping.py`), the output node its `func.return`.
Result types come from each node's FakeTensor (`node.meta["val"]`); symbolic dims become
`?` dims. An aten op without a mapping becomes `ft.torch_call`, counted in
`ImportedGraph.fallbacks`: a fallback is reported, never a failed compile.

`python -m flagtree.frontend.importer --markdown` prints the mapping table (docs/importer.md).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from flagtree.errors import FlagtreeError
from flagtree.frontend import aten_mapping
from flagtree.frontend.aten_mapping import Unmapped, target_name
from flagtree.frontend.symbolic import SymbolicSizes, UnsupportedSize
from flagtree.ir.attributes import DenseAttr, ResourceAttr
from flagtree.ir.builder import Builder, new_function
from flagtree.ir.core import Location, Module, Operation, Value
from flagtree.ir.types import F64, I1, I64, ScalarType, TensorType, Type, from_torch_dtype, types_compatible

# Tensor constants up to this many elements are written into the IR text; larger ones are
# resources held beside it (Module.resources), like weights.
MAX_INLINE_ELEMENTS = 16
SYMBOLS_ATTR = "ft.symbols"


class GraphImportError(FlagtreeError):
    """The graph cannot be expressed in FTIR (e.g. a dtype FTIR lacks); names the node."""


class UnsupportedGraph(GraphImportError):
    """The graph uses a construct FTIR has no form for but torch runs: a higher-order op that
    takes a subgraph (flex_attention's score_mod, cond, while_loop, ...).  `construct` names it;
    the graph compiler runs such a graph in eager torch, as one counted fallback."""

    def __init__(self, message: str, construct: str):
        super().__init__(message)
        self.construct = construct


@dataclass(frozen=True)
class ConstantOutput:
    """A graph output that is not a tensor computed at run time (None, or a static int)."""

    value: Any


@dataclass
class ImportedGraph:
    """The FTIR module plus what the runtime needs to call it like the FX graph."""

    module: Module
    # Which graph inputs are passed to @main, in order (None inputs and constants are not).
    arg_indices: list[int]
    # Each graph output: an index into @main's results, or a ConstantOutput.
    outputs: list[int | ConstantOutput]
    fallbacks: Counter = field(default_factory=Counter)
    fallback_reasons: dict[str, str] = field(default_factory=dict)
    # What each FX node became: an FTIR Value, a list of them (several results), a Python scalar or None.
    node_values: dict[fx.Node, Any] = field(default_factory=dict)


def import_graph(
    gm: fx.GraphModule, constants: dict[int, tuple[str, torch.Tensor]] | None = None, function: str = "main"
) -> ImportedGraph:
    """Import `gm` as `@function`; `constants` maps placeholder index → (resource name, tensor)
    for inputs baked into the module (frozen parameters)."""
    # Compilers run under aot_autograd's FakeTensorMode; constants need real tensors.
    with unset_fake_temporarily():
        return FXImporter(gm, constants or {}, function).run()


def _location(node: fx.Node) -> Location:
    """The user's source line that produced `node` (the innermost frame of its stack trace)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    if not frames:
        return Location(name=node.name)
    file, line = frames[-1]
    return Location(file=file, line=int(line), name=node.name)


def symbolic_expr(size: Any) -> sympy.Expr | None:
    """The sympy expression of a symbolic size, or None for a static one."""
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = size.node.expr
        return None if expr.is_number else expr
    return None


def static_dim(size: Any) -> int | None:
    """A dim's static value, or None when it is symbolic."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else None
    return int(size)


def ftir_type(val: Any, where: str) -> Type:
    """The FTIR type of a FakeTensor or Python/symbolic scalar from `node.meta["val"]`."""
    if isinstance(val, torch.Tensor):
        try:
            dtype = from_torch_dtype(val.dtype)
        except ValueError as e:
            raise GraphImportError(f"{where}: {e}; flagtree cannot compile graphs with such tensors") from None
        return TensorType(tuple(static_dim(d) for d in val.shape), dtype)
    if isinstance(val, (bool, torch.SymBool)):
        return I1
    if isinstance(val, (int, torch.SymInt)):
        return I64
    if isinstance(val, (float, torch.SymFloat)):
        return F64
    raise GraphImportError(f"{where}: a value of Python type {type(val).__name__} has no FTIR type")


class FXImporter:
    """Walks the FX graph once, emitting FTIR; lowerings call back into its helpers."""

    def __init__(self, gm: fx.GraphModule, constants: dict[int, tuple[str, torch.Tensor]], function: str):
        self.gm = gm
        self.constants = constants
        self.module = Module.empty()
        self.func, self.block = new_function(self.module, function, [])
        self.builder = Builder(self.block)
        self.values: dict[fx.Node, Any] = {}
        self.sizes = SymbolicSizes(self.emit)
        self.arg_indices: list[int] = []
        self.fallbacks: Counter = Counter()
        self.fallback_reasons: dict[str, str] = {}
        self.node: fx.Node | None = None

    # ------------------------------------------------------------------ driver
    def run(self) -> ImportedGraph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for index, node in enumerate(placeholders):
            self._import_placeholder(index, node)
        self._record_symbols(placeholders)
        outputs: list[int | ConstantOutput] = []
        for node in self.gm.graph.nodes:
            self.node = node
            self.builder.location = _location(node)
            if node.op == "call_function":
                self.values[node] = self._import_call(node)
            elif node.op == "get_attr":
                self.values[node] = self._import_get_attr(node)
            elif node.op == "output":
                outputs = self._import_output(node)
        return ImportedGraph(self.module, self.arg_indices, outputs, self.fallbacks, self.fallback_reasons,
                             self.values)

    def _import_placeholder(self, index: int, node: fx.Node) -> None:
        if index in self.constants:
            name, tensor = self.constants[index]
            self.module.resources[name] = tensor
            attr = ResourceAttr(name, ftir_type(tensor, node.name))
            self.builder.location = Location(name=node.name)
            self.values[node] = self.emit("ft.constant", [], {"value": attr}, attr.type)
            return
        val = node.meta.get("val")
        if val is None:
            self.values[node] = None
            return
        arg = self.block.add_argument(ftir_type(val, node.name))
        self.arg_indices.append(index)
        self.values[node] = arg
        expr = symbolic_expr(val)
        if expr is not None:
            self.sizes.remember(expr, arg)

    def _record_symbols(self, placeholders: list[fx.Node]) -> None:
        """Bind each plain symbol to its first tensor dim (else its SymInt argument) and
        record the binding as the function's `ft.symbols` attribute."""
        symbols: dict[str, tuple[int, ...]] = {}
        arguments = {id(a): i for i, a in enumerate(self.block.args)}
        for node in placeholders:
            val, value = node.meta.get("val"), self.values.get(node)
            if not isinstance(val, torch.Tensor) or id(value) not in arguments:
                continue
            for dim, size in enumerate(val.shape):
                expr = symbolic_expr(size)
                if isinstance(expr, sympy.Symbol) and self.sizes.bind_dim(expr, value, dim):
                    symbols[str(expr)] = (arguments[id(value)], dim)
        for node in placeholders:
            expr, value = symbolic_expr(node.meta.get("val")), self.values.get(node)
            if isinstance(expr, sympy.Symbol) and id(value) in arguments and self.sizes.bind_value(expr, value):
                symbols[str(expr)] = (arguments[id(value)],)
        if symbols:
            self.func.attributes[SYMBOLS_ATTR] = symbols

    def _import_get_attr(self, node: fx.Node) -> Value:
        tensor = getattr(self.gm, node.target)
        if isinstance(tensor, fx.GraphModule):
            users = sorted({str(user.target) for user in node.users})
            construct = users[0] if users else str(node.target)
            raise UnsupportedGraph(f"{_location(node)}: {', '.join(users) or 'an op'} takes the subgraph "
                                   f"'{node.target}', and FTIR has no subgraph operands", construct)
        if not isinstance(tensor, torch.Tensor):
            raise GraphImportError(
                f"{_location(node)}: get_attr '{node.target}' is a {type(tensor).__name__}, not a tensor"
            )
        type_ = ftir_type(tensor, node.name)
        if tensor.numel() <= MAX_INLINE_ELEMENTS:
            return self.emit("ft.constant", [], {"value": DenseAttr(tensor.detach().clone())}, type_)
        name = re.sub(r"[^A-Za-z0-9_.]", "_", node.target)
        self.module.resources[name] = tensor.detach()
        return self.emit("ft.constant", [], {"value": ResourceAttr(name, type_)}, type_)

    def _import_output(self, node: fx.Node) -> list[int | ConstantOutput]:
        (results,) = node.args
        returned: list[Value] = []
        slots: list[int | ConstantOutput] = []
        for item in results if isinstance(results, (list, tuple)) else [results]:
            value = self.values[item] if isinstance(item, fx.Node) else item
            if isinstance(value, Value):
                slots.append(len(returned))
                returned.append(value)
            else:
                slots.append(ConstantOutput(value))
        self.builder.create("func.return", returned, result_types=[])
        return slots

    def _import_call(self, node: fx.Node) -> Any:
        name = target_name(node.target)
        lowering = aten_mapping.LOWERINGS.get(name)
        val = node.meta.get("val")
        try:
            if lowering is not None:
                result = lowering.fn(self, node, aten_mapping.bind(node))
                self._check_result(node, result)
                return result
            if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
                return self._size_node(val)
            reason = aten_mapping.DOCUMENTED_FALLBACKS.get(name, "no FTIR mapping yet")
        except (Unmapped, UnsupportedSize) as e:
            reason = str(e)
        return self._fallback(node, reason)

    def _size_node(self, val: int | torch.SymInt) -> int | Value:
        """A size computed by an op with no mapping (sym_max, ...): rebuilt from its expression."""
        expr = symbolic_expr(val)
        return int(val) if expr is None else self.sizes.materialize(expr)

    def _check_result(self, node: fx.Node, result: Any) -> None:
        """A lowering must produce the types the graph says (catches mapping bugs early)."""
        val = node.meta.get("val")
        pairs = zip(result, val) if isinstance(result, (list, tuple)) else [(result, val)]
        for value, expected in pairs:
            if isinstance(value, Value) and expected is not None:
                want = ftir_type(expected, node.name)
                if not types_compatible(value.type, want):
                    raise GraphImportError(
                        f"{_location(node)}: importing {target_name(node.target)} produced {value.type} but the "
                        f"graph says {want} (a bug in flagtree/frontend/aten_mapping.py)"
                    )

    # ------------------------------------------------------------------ fallback
    def _fallback(self, node: fx.Node, reason: str) -> Any:
        if not isinstance(node.target, torch._ops.OpOverload):
            raise GraphImportError(
                f"{_location(node)}: '{target_name(node.target)}' is not an aten op and has no FTIR mapping "
                f"({reason}); flagtree cannot run it"
            )
        operands: list[Value] = []
        args = [self._encode(a, operands) for a in node.args]
        kwargs = {k: self._encode(v, operands) for k, v in node.kwargs.items()}
        val = node.meta.get("val")
        outputs = list(val) if isinstance(val, (list, tuple)) else [val]
        types = [ftir_type(v, node.name) for v in outputs if v is not None]
        schema = node.target._schema
        attrs = {"target": f"{schema.name}.{node.target._overloadname}", "args": args}
        if kwargs:
            attrs["kwargs"] = kwargs
        op = self.builder.create("ft.torch_call", operands, attrs, types)
        aten = target_name(node.target)
        self.fallbacks[aten] += 1
        self.fallback_reasons[aten] = reason
        results = iter(op.results)
        if isinstance(val, (list, tuple)):
            return [None if v is None else next(results) for v in outputs]
        return op.results[0] if op.results else None

    def _encode(self, arg: Any, operands: list[Value]) -> Any:
        """A torch_call argument as an attribute; tensors and sizes become `{operand = i}`."""
        if isinstance(arg, fx.Node):
            arg = self.values[arg]
        if isinstance(arg, Value):
            operands.append(arg)
            return {"operand": len(operands) - 1}
        if isinstance(arg, (list, tuple)):
            items = [self._encode(a, operands) for a in arg]
            all_ints = all(isinstance(a, int) and not isinstance(a, bool) for a in items)
            return tuple(items) if all_ints and items else items
        if isinstance(arg, torch.dtype):
            return from_torch_dtype(arg)
        if isinstance(arg, torch.device):
            return str(arg)
        if isinstance(arg, (torch.layout, torch.memory_format)):
            # Layout and memory format change strides, never values; the defaults are equivalent.
            return None
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return arg
        raise GraphImportError(
            f"{self.builder.location}: cannot pass {type(arg).__name__} {arg!r} to eager "
            f"{target_name(self.node.target)} (no FTIR attribute holds it)"
        )

    # ------------------------------------------------------------------ helpers for lowerings
    def emit(
        self, name: str, operands: list[Value], attrs: dict | None = None, result_type: Type | None = None
    ) -> Value:
        """Create a single-result op at the current node's location."""
        return self.emit_op(name, operands, attrs, None if result_type is None else [result_type]).result

    def emit_op(
        self, name: str, operands: list[Value], attrs: dict | None = None, result_types: list[Type] | None = None
    ) -> Operation:
        """Create an op (any number of results); result types are inferred when None."""
        return self.builder.create(name, operands, attrs or {}, result_types)

    def value(self, arg: Any) -> Value:
        """The FTIR value of an FX argument that is a tensor or a symbolic size."""
        value = self.values[arg] if isinstance(arg, fx.Node) else arg
        if not isinstance(value, Value):
            raise Unmapped(f"expected a tensor or size argument, got {type(value).__name__} {value!r}")
        return value

    def operand(self, arg: Any, dtype: ScalarType) -> Value:
        """An operand of element type `dtype`: a value cast if needed, or a Python number
        as a 0-d constant (type promotion made explicit)."""
        value = self.values[arg] if isinstance(arg, fx.Node) else arg
        if isinstance(value, Value):
            return self.cast(value, dtype)
        if isinstance(value, (bool, int, float)):
            return self.scalar_tensor(value, dtype)
        raise Unmapped(f"expected a tensor or a number, got {type(value).__name__} {value!r}")

    def scalar_tensor(self, number: bool | int | float, dtype: ScalarType) -> Value:
        """A 0-d `ft.constant` holding `number` as `dtype`."""
        attr = DenseAttr(torch.tensor(number, dtype=dtype.torch_dtype))
        return self.emit("ft.constant", [], {"value": attr}, attr.type)

    def cast(self, value: Value, dtype: ScalarType) -> Value:
        """`value` converted to element type `dtype` (no op when it already is)."""
        current = value.type.dtype if isinstance(value.type, TensorType) else value.type
        if current == dtype:
            return value
        target = value.type.with_dtype(dtype) if isinstance(value.type, TensorType) else dtype
        return self.emit("ft.cast", [value], {}, target)

    def result_type(self, node: fx.Node, index: int | None = None) -> Type:
        """The FTIR type of `node`'s result (or of result `index` of a multi-result node)."""
        val = node.meta["val"] if index is None else node.meta["val"][index]
        return ftir_type(val, node.name)

    def dtype_of(self, node: fx.Node) -> ScalarType:
        """The element type of `node`'s (first) tensor result."""
        val = node.meta["val"]
        val = val[0] if isinstance(val, (list, tuple)) else val
        return ftir_type(val, node.name).dtype

    def sizes_of(self, shape: Any) -> list[Value]:
        """One i64 value per symbolic dim of `shape` (a FakeTensor's shape), in order."""
        return [self.sizes.materialize(symbolic_expr(d)) for d in shape if static_dim(d) is None]

    def sized(self, name: str, operands: list[Value], node: fx.Node, attrs: dict | None = None) -> Value:
        """A sized op (reshape, broadcast_to, full, iota) producing `node`'s result type."""
        return self.sized_like(name, operands, node.meta["val"], attrs)

    def sized_like(self, name: str, operands: list[Value], val: torch.Tensor, attrs: dict | None = None) -> Value:
        """A sized op producing a tensor typed like the FakeTensor `val`."""
        return self.emit(name, [*operands, *self.sizes_of(val.shape)], attrs, ftir_type(val, str(self.node)))

    def scalar_value(self, arg: Any, dtype: ScalarType) -> Value:
        """A scalar (non-tensor) operand of type `dtype`: a size value cast if needed, or a constant."""
        value = self.values[arg] if isinstance(arg, fx.Node) else arg
        if isinstance(value, Value):
            return self.cast(value, dtype)
        return self.emit("ft.constant", [], {"value": float(value) if dtype.is_float else int(value)}, dtype)

    def dims_of(self, value: Value) -> list[Value]:
        """One `ft.dim` per dynamic dim of `value` (to size an op shaped like it)."""
        return [self.emit("ft.dim", [value], {"dim": i}) for i, d in enumerate(value.type.shape) if d is None]


def mapping_markdown() -> str:
    """docs/importer.md: the aten → FTIR mapping table, generated from `aten_mapping`."""
    lines = [
        "# Importer: aten → FTIR",
        "",
        "Generated by `python -m flagtree.frontend.importer --markdown` from",
        "`flagtree/frontend/aten_mapping.py`; `tests/test_importer.py` checks this file is current.",
        "",
        "The frontend runs aot_autograd with torch's core ATen decompositions",
        "(`torch._decomp.core_aten_decompositions()`), so graphs arrive functionalized and in",
        "the core ATen opset. Each node's result type comes from its FakeTensor; symbolic dims",
        "become `?` dims and their sizes are rebuilt from `ft.dim` reads and i64 arithmetic",
        "(the function's `ft.symbols` attribute says which argument dim each symbol is).",
        "An aten op with no row below becomes `ft.torch_call {target = \"aten::name.overload\"}`:",
        "it runs through eager torch, and reports count it (`flagtree.reports()`).",
        "",
        "Type promotion is explicit: operands are cast to the dtype eager computes in. That is the",
        "result dtype, except where eager's kernel reads a scalar operand (a Python number or a 0-d",
        "CPU tensor) of a bf16/f16 op in f32 (on CPU: mul, div, floor_divide by a scalar; on CUDA",
        "also add and sub): then the op computes in f32 and its result is cast back, rounding once",
        "as eager does.",
        "",
        "## Mapped ops",
        "",
        "| aten / Python op | FTIR |",
        "|---|---|",
    ]
    for name in sorted(aten_mapping.LOWERINGS):
        lines.append(f"| `{name}` | {aten_mapping.LOWERINGS[name].ftir} |")
    lines += [
        "",
        "## Decomposed before import",
        "",
        "Core ATen ops FTIR has no op for; torch's own decompositions",
        "(`torch._decomp.get_decompositions`) rewrite them into mapped ops.",
        "",
        "| aten op | why |",
        "|---|---|",
    ]
    for name, reason in sorted(aten_mapping.EXTRA_DECOMPOSITIONS.items()):
        lines.append(f"| `{name}` | {reason} |")
    lines += [
        "",
        "Fused ops torch has no decomposition for, rewritten by flagtree's own:",
        "",
        "| aten op | why |",
        "|---|---|",
    ]
    for name, (reason, _) in sorted(aten_mapping.OWN_DECOMPOSITIONS.items()):
        lines.append(f"| `{name}` | {reason} |")
    lines += [
        "",
        "## Kept whole",
        "",
        "Ops torch's core ATen decompositions would rewrite, left out of the table because a",
        "row above maps them to a fused FTIR op.",
        "",
        "| aten op | why |",
        "|---|---|",
    ]
    for name, reason in sorted(aten_mapping.KEPT_FROM_DECOMPOSITION.items()):
        lines.append(f"| `{name}` | {reason} |")
    lines += [
        "",
        "## Known fallbacks",
        "",
        "Ops that stay `ft.torch_call` on purpose:",
        "",
        "| aten op | why |",
        "|---|---|",
    ]
    for name, reason in sorted(aten_mapping.DOCUMENTED_FALLBACKS.items()):
        lines.append(f"| `{name}` | {reason} |")
    return "\n".join(lines) + "\n"


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flagtree.frontend.importer", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the aten → FTIR mapping table")
    args = parser.parse_args()
    if args.markdown:
        print(mapping_markdown(), end="")
    else:
        parser.print_help()


if __name__ == "__main__":
    _main()
