"""Constants, generators, eager-torch fallback calls, fusion regions and structure ops."""

from __future__ import annotations

import math
from typing import Any

import torch

from flagtree.ir.attributes import DenseAttr, ResourceAttr
from flagtree.ir.core import Operation
from flagtree.ir.opdef import PURE, TERMINATOR, AttrSpec, OpDef, register
from flagtree.ir.ops._util import runtime_shape, sized_result, torch_dtype
from flagtree.ir.types import ScalarType, Type


def _infer_constant(op: Operation) -> list[Type] | str:
    value = op.attributes["value"]
    result = op.results[0].type if op.results else None
    if isinstance(value, (DenseAttr, ResourceAttr)):
        if value.type != result:
            return f"value has type {value.type} but the result is {result}"
        return [result]
    if not isinstance(result, ScalarType):
        return f"a scalar value needs a scalar result type, not {result}"
    if isinstance(value, float) and not result.is_float:
        return f"float value for integer result type {result}"
    return [result]


def _constant(args: list[Any], a: dict, rt: list[Type]) -> Any:
    value = a["value"]
    if isinstance(value, DenseAttr):
        return value.value
    if isinstance(value, ResourceAttr):
        raise LookupError(f"resource '{value.name}' must be bound by the executor")
    return value


register(OpDef(
    "ft.constant", "a literal: dense tensor, named resource (weights), or scalar", (0, 0),
    attrs={"value": AttrSpec((DenseAttr, ResourceAttr, int, float, bool), "the value")},
    infer=_infer_constant, reference=_constant,
))


def _infer_full(op: Operation) -> list[Type] | str:
    return sized_result(op, 0)


register(OpDef(
    "ft.full", "a tensor of the result type filled with `value`", (0, None),
    attrs={"value": AttrSpec((int, float, bool), "fill value")}, infer=_infer_full,
    operand_doc="one i64 per dynamic result dim",
    reference=lambda args, a, rt: torch.full(runtime_shape(rt[0], args), a["value"], dtype=torch_dtype(rt[0])),
))


def _infer_iota(op: Operation) -> list[Type] | str:
    result = sized_result(op, 0)
    if isinstance(result, str):
        return result
    if result[0].rank != 1:
        return "iota produces a 1-d tensor"
    return result


def _iota(args: list[Any], a: dict, rt: list[Type]) -> torch.Tensor:
    (n,) = runtime_shape(rt[0], args)
    start, step = a["start"], a["step"]
    exact = isinstance(start, int) and isinstance(step, int)
    values = torch.arange(n, dtype=torch.int64 if exact else torch.float64) * step + start
    return values.to(torch_dtype(rt[0]))


register(OpDef(
    "ft.iota", "start + i * step for i in [0, n), n the result size (torch.arange)", (0, 1),
    attrs={"start": AttrSpec((int, float), "first value"), "step": AttrSpec((int, float), "increment")},
    infer=_infer_iota, reference=_iota, operand_doc="n (i64) when the result size is dynamic",
))


def _infer_torch_call(op: Operation) -> list[Type] | str:
    target = op.attributes["target"]
    if resolve_aten(target) is None:
        return f"unknown torch op '{target}' (expected aten::name.overload)"
    return [r.type for r in op.results]


def fallback_name(op: Operation) -> str:
    """How reports and launch plans name an ft.torch_call's eager op: `aten.relu.default`, as
    torch prints it (the attribute holds the schema name `aten::relu.default`)."""
    return op.attributes["target"].replace("::", ".")


def resolve_aten(target: str) -> Any:
    """`aten::add.Tensor` → torch.ops.aten.add.Tensor, or None if it does not exist."""
    namespace, _, qualified = target.partition("::")
    name, _, overload = qualified.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        return None


def unpack_args(template: Any, operands: list[Any]) -> Any:
    """Rebuild a torch_call argument from its attribute template: `{operand = i}` is operand i."""
    if isinstance(template, dict):
        if set(template) == {"operand"}:
            return operands[template["operand"]]
        if set(template) == {"list_of_operands"}:
            return [operands[i] for i in template["list_of_operands"]]
        return {k: unpack_args(v, operands) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return [unpack_args(v, operands) for v in template]
    if isinstance(template, ScalarType):
        return template.torch_dtype
    if isinstance(template, float) and math.isnan(template):
        return math.nan
    return template


def _torch_call(args: list[Any], a: dict, rt: list[Type]) -> Any:
    fn = resolve_aten(a["target"])
    out = fn(*unpack_args(a["args"], args), **unpack_args(a.get("kwargs", {}), args))
    # The op's results are its outputs in order, minus those it did not compute (None, such
    # as a gradient convolution_backward was not asked for): those have no FTIR type.
    return tuple(o for o in out if o is not None) if isinstance(out, (list, tuple)) else out


register(OpDef(
    "ft.torch_call", "fallback: call a torch op eagerly (counted and reported)", (0, None), results=(0, None),
    attrs={"target": AttrSpec((str,), "aten::name.overload"),
           "args": AttrSpec((list,), "positional arguments; {operand = i} refers to operand i"),
           "kwargs": AttrSpec((dict,), "keyword arguments, same encoding", required=False)},
    traits=frozenset(), infer=_infer_torch_call, reference=_torch_call,
    operand_doc="the tensors and sizes the arguments refer to",
))


def _infer_yield(op: Operation) -> list[Type] | str:
    return []


register(OpDef("ft.yield", "return values from an ft.fusion region", (0, None), results=(0, 0),
               traits=frozenset({PURE, TERMINATOR}), infer=_infer_yield))
register(OpDef("func.return", "return values from a function", (0, None), results=(0, 0),
               traits=frozenset({PURE, TERMINATOR}), infer=_infer_yield))


def _infer_fusion(op: Operation) -> list[Type] | str:
    if len(op.regions) != 1:
        return "ft.fusion needs exactly one region"
    block = op.regions[0].block
    if [a.type for a in block.args] != [v.type for v in op.operands]:
        return "the region's arguments must match the operands' types"
    term = block.terminator
    if term is None or term.name != "ft.yield":
        return "the region must end with ft.yield"
    return [v.type for v in term.operands]


register(OpDef(
    "ft.fusion", "a group of ops compiled as one kernel; the region's arguments are the operands",
    (0, None), results=(1, None), attrs={"kind": AttrSpec((str,), "what was fused", required=False)},
    traits=frozenset({PURE}), infer=_infer_fusion,
))
