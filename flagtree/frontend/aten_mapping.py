"""The aten → FTIR mapping: one lowering per aten op (family), registered in `LOWERINGS`.

A lowering gets the importer (`ctx`, see `FXImporter`'s helpers), the FX node and its
arguments bound to the op's schema names, and returns the node's FTIR value(s). It raises
`Unmapped` for a case it does not cover; the importer then falls back to `ft.torch_call`.
docs/importer.md is generated from this table (`python -m flagtree.frontend.importer --markdown`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch
import torch.fx as fx
from torch._prims_common import get_computation_dtype

from flagtree.frontend.encoder_layer import transformer_encoder_layer
from flagtree.ir.core import Value
from flagtree.ir.types import F64, I1, I64, ScalarType, TensorType, from_torch_dtype

if TYPE_CHECKING:
    from flagtree.frontend.importer import FXImporter

# `end` of a slice that runs to the end of its dim (Python slice semantics clamp it).
SLICE_END = 2**63 - 1


class Unmapped(Exception):
    """This node's arguments fall outside what the lowering maps; it becomes ft.torch_call."""


Lower = Callable[["FXImporter", fx.Node, dict[str, Any]], Any]


@dataclass(frozen=True)
class Lowering:
    ftir: str  # what the op becomes, for docs/importer.md
    fn: Lower


LOWERINGS: dict[str, Lowering] = {}

# Core ATen ops FTIR has no op for, rewritten by torch's own decompositions before import.
EXTRA_DECOMPOSITIONS: dict[str, str] = {
    "aten.native_layer_norm.default": "FTIR has no layer-norm op; the decomposition is mean/var/rsqrt, "
    "which the norm fusion recognises",
    "aten.native_group_norm.default": "FTIR has no group-norm op",
    "aten._native_batch_norm_legit_no_training.default": "FTIR has no batch-norm op (inference: a scale and shift)",
    "aten._native_batch_norm_legit_functional.default": "FTIR has no batch-norm op (training: batch statistics)",
    "aten._native_batch_norm_legit.default": "FTIR has no batch-norm op",
    "aten.max_pool2d_with_indices.default": "FTIR has no pooling op; the decomposition is index + amax/argmax",
    "aten.max_pool2d_with_indices_backward.default": "FTIR has no pooling op",
    "aten.repeat.default": "FTIR has no tiling op; the decomposition is broadcast_to + reshape",
    "aten.linalg_vector_norm.default": "FTIR has no norm op; the decomposition is abs/pow + sum",
    "aten.upsample_nearest2d.vec": "FTIR has no resize op; the decomposition is iota + index",
}

# Fused aten ops torch has no decomposition for, rewritten by flagtree's own before import:
# name -> (why, the decomposition).
OWN_DECOMPOSITIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "aten._transformer_encoder_layer_fwd.default": (
        "nn.TransformerEncoderLayer's fused inference op: into its layer norms, projections, SDPA "
        "(`ft.attention`) and feed-forward (frontend/encoder_layer.py)", transformer_encoder_layer),
}

# Ops torch's core ATen decompositions would rewrite, kept whole because a lowering maps them.
KEPT_FROM_DECOMPOSITION: dict[str, str] = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "F.scaled_dot_product_attention on CPU tensors; "
    "imported as `ft.attention` instead of its math form",
}

# Ops that stay ft.torch_call on purpose, and why.
DOCUMENTED_FALLBACKS: dict[str, str] = {
    "aten.convolution_backward.default": "torch has no decomposition for it and FTIR's ft.conv is forward-only; "
    "backends call their library's convolution backward",
    "aten.avg_pool2d.default": "FTIR has no pooling op and torch has no decomposition for it",
    "aten.native_dropout.default": "random numbers come from torch's generator so results match eager",
    "aten.rand.default": "random numbers come from torch's generator so results match eager",
    "aten.randn.default": "random numbers come from torch's generator so results match eager",
    "aten.nonzero.default": "its result size depends on the data",
    "aten.as_strided.default": "FTIR values have no strides to reinterpret",
    **{f"aten.{name}_backward.default": "FTIR has no attention backward op; torch's fused kernel computes the "
       "gradients from the forward's saved logsumexp" for name in (
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
           "_scaled_dot_product_fused_attention_overrideable", "_efficient_attention")},
}


def target_name(target: Any) -> str:
    """The table key of an FX call target: `aten.add.Tensor`, `operator.getitem`, ..."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module.lstrip('_')}.{getattr(target, '__name__', repr(target))}"


def bind(node: fx.Node) -> dict[str, Any]:
    """An aten node's arguments by schema name, defaults filled in ({} for Python targets)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return {}
    bound: dict[str, Any] = {}
    for index, arg in enumerate(node.target._schema.arguments):
        if not arg.kwarg_only and index < len(node.args):
            bound[arg.name] = node.args[index]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def lowering(*targets: str, ftir: str) -> Callable[[Lower], Lower]:
    """Register `fn` as the lowering of each aten op in `targets`."""

    def register(fn: Lower) -> Lower:
        for target in targets:
            if target in LOWERINGS:
                raise ValueError(f"'{target}' has two lowerings")
            LOWERINGS[target] = Lowering(ftir, fn)
        return fn

    return register


def _code(name: str) -> str:
    return f"`{name}`"


# --------------------------------------------------------------------------- type promotion


def _surrogate(ctx: FXImporter, arg: Any) -> Any:
    """Something torch.result_type ranks like `arg`: a tiny tensor of its dtype and
    dimensionality class (0-d or not), or a Python number."""
    if isinstance(arg, fx.Node):
        arg = ctx.values[arg]
    if isinstance(arg, Value):
        if isinstance(arg.type, TensorType):
            return torch.empty((1,) * min(arg.type.rank, 1), dtype=arg.type.dtype.torch_dtype)
        return {"i1": False, "f64": 0.0}.get(arg.type.name, 0)
    return arg


def promoted_dtype(ctx: FXImporter, lhs: Any, rhs: Any) -> ScalarType:
    """The dtype torch computes `lhs op rhs` in (comparisons compare in it)."""
    return from_torch_dtype(torch.result_type(_surrogate(ctx, lhs), _surrogate(ctx, rhs)))


def _positional(args: dict[str, Any], count: int) -> list[Any]:
    return list(args.values())[:count]


# The eager kernels that read a scalar operand (a Python number, or a 0-d CPU tensor: TensorIterator's
# "cpu scalar") of a reduced-precision float op in the op-math type instead of rounding it to the op's
# dtype first: device type → aten op → the operand positions they do it for. CPU: mul and the div kernels
# take `iter.original_scalar_value<opmath_t>(2)`; CUDA: add, sub and mul run
# opmath_symmetric_gpu_kernel_with_scalars, the div kernels take a scalar divisor in op-math. Every other
# kernel (add on CPU, remainder, pow, a 0-d tensor on the GPU, ...) rounds the scalar to the op's dtype, as
# the importer's casts do. Measured bit for bit against eager on torch 2.13 (CPU) and 2.11 (H200).
_SCALAR_IN_OPMATH: dict[str, dict[str, frozenset[int]]] = {
    "cpu": {"mul": frozenset({1}), "div": frozenset({1}), "floor_divide": frozenset({1})},
    "cuda": {"add": frozenset({0, 1}), "sub": frozenset({0, 1}), "mul": frozenset({0, 1}), "div": frozenset({1}),
             "floor_divide": frozenset({1})},
}


def _rounds_cpu_scalar(arg: Any, dtype: ScalarType) -> bool:
    """`arg` is a CPU scalar that converting to `dtype` may round: a Python or symbolic number
    `dtype` does not hold exactly, or a 0-d CPU tensor of another dtype."""
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
    if isinstance(val, torch.Tensor):
        return val.dim() == 0 and val.device.type == "cpu" and val.dtype != dtype.torch_dtype
    if isinstance(val, (torch.SymInt, torch.SymFloat)):
        return True
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return torch.tensor(val, dtype=dtype.torch_dtype).item() != val
    return False


def _computation_dtype(node: fx.Node, operands: list[Any], result: ScalarType) -> ScalarType:
    """The dtype eager computes the arithmetic `node` in before rounding to `result`: the op-math
    type of a reduced-precision float (torch._prims_common's computation dtype, f32) when its kernel
    reads a scalar operand that way (_SCALAR_IN_OPMATH) and the operand would lose digits in
    `result`; else `result` itself."""
    opmath = from_torch_dtype(get_computation_dtype(result.torch_dtype))
    if opmath == result:
        return result
    op = node.target._schema.name.split("::")[1]
    positions = _SCALAR_IN_OPMATH.get(node.meta["val"].device.type, {}).get(op, frozenset())
    return opmath if any(_rounds_cpu_scalar(operands[i], result) for i in positions) else result


# --------------------------------------------------------------------------- elementwise

_UNARY_SAME = ("exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "atan",
               "sigmoid", "erf", "reciprocal", "floor", "ceil", "round", "trunc", "neg", "abs", "sign", "relu",
               "silu", "bitwise_not")
_UNARY_PREDICATE = ("isnan", "isinf", "logical_not")


def _unary(ft_name: str, cast_to_result: bool) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        x = ctx.operand(args["self"], ctx.dtype_of(node)) if cast_to_result else ctx.value(args["self"])
        return ctx.emit(ft_name, [x])

    return lower


for _name in _UNARY_SAME:
    lowering(f"aten.{_name}.default", ftir=_code(f"ft.{_name}"))(_unary(f"ft.{_name}", True))
for _name in _UNARY_PREDICATE:
    lowering(f"aten.{_name}.default", ftir=_code(f"ft.{_name}"))(_unary(f"ft.{_name}", False))


def _binary(ft_name: str) -> Lower:
    """Arithmetic in eager's computation dtype: operands are cast to it (aten's type promotion),
    the result to the result dtype."""

    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        operands = _positional(args, 2)
        dtype = _computation_dtype(node, operands, ctx.dtype_of(node))
        lhs, rhs = (ctx.operand(a, dtype) for a in operands)
        alpha = args.get("alpha", 1)
        if alpha is not None and alpha != 1:
            rhs = ctx.emit("ft.mul", [rhs, ctx.operand(alpha, dtype)])
        return ctx.cast(ctx.emit(ft_name, [lhs, rhs]), ctx.dtype_of(node))

    return lower


_BINARY = {
    "add": "ft.add", "sub": "ft.sub", "mul": "ft.mul", "div": "ft.div", "remainder": "ft.remainder",
    "fmod": "ft.fmod", "bitwise_and": "ft.bitwise_and", "bitwise_or": "ft.bitwise_or",
    "bitwise_xor": "ft.bitwise_xor", "floor_divide": "ft.floordiv",
}
for _name, _ft in _BINARY.items():
    _doc = _code(_ft) + (" (× alpha when alpha ≠ 1)" if _name in ("add", "sub") else "")
    lowering(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar", ftir=_doc)(_binary(_ft))
lowering("aten.floor_divide.default", ftir=_code("ft.floordiv"))(_binary("ft.floordiv"))
lowering("aten.pow.Tensor_Tensor", "aten.pow.Tensor_Scalar", "aten.pow.Scalar", ftir=_code("ft.pow"))(
    _binary("ft.pow"))
for _name in ("maximum", "minimum", "atan2"):
    lowering(f"aten.{_name}.default", ftir=_code(f"ft.{_name}"))(_binary(f"ft.{_name}"))


@lowering("aten.div.Tensor_mode", "aten.div.Scalar_mode",
          ftir="`ft.div`; floor: `ft.floordiv`; trunc: `ft.div` + `ft.trunc` (floats)")
def _div_mode(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    operands = _positional(args, 2)
    dtype = _computation_dtype(node, operands, ctx.dtype_of(node))
    lhs, rhs = (ctx.operand(a, dtype) for a in operands)
    mode = args["rounding_mode"]
    if mode == "floor":
        quotient = ctx.emit("ft.floordiv", [lhs, rhs])
    else:
        quotient = ctx.emit("ft.div", [lhs, rhs])
        # ft.div truncates on integers already.
        quotient = ctx.emit("ft.trunc", [quotient]) if mode == "trunc" and dtype.is_float else quotient
    return ctx.cast(quotient, ctx.dtype_of(node))


def _compare(ft_name: str) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        lhs, rhs = _positional(args, 2)
        dtype = promoted_dtype(ctx, lhs, rhs)
        return ctx.emit(ft_name, [ctx.operand(lhs, dtype), ctx.operand(rhs, dtype)])

    return lower


for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    lowering(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar", ftir=_code(f"ft.{_name}"))(_compare(f"ft.{_name}"))


def _logical(ft_name: str) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        return ctx.emit(ft_name, [ctx.value(a) for a in _positional(args, 2)])

    return lower


for _name in ("logical_and", "logical_or", "logical_xor"):
    lowering(f"aten.{_name}.default", ftir=_code(f"ft.{_name}"))(_logical(f"ft.{_name}"))


@lowering("aten.gelu.default", ftir="`ft.gelu`")
def _gelu(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.emit("ft.gelu", [ctx.value(args["self"])], {"approximate": args["approximate"]})


@lowering("aten.where.self", ftir="`ft.where`")
def _where(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    cond = ctx.operand(args["condition"], I1)
    return ctx.emit("ft.where", [cond, ctx.operand(args["self"], dtype), ctx.operand(args["other"], dtype)])


@lowering("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default", ftir="`ft.clamp`")
def _clamp(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    bounds = {k: args.get(k) for k in ("min", "max")}
    if any(isinstance(b, fx.Node) for b in bounds.values()):
        raise Unmapped("symbolic clamp bounds")
    convert = float if dtype.is_float else int
    attrs = {k: convert(b) for k, b in bounds.items() if b is not None}
    return ctx.emit("ft.clamp", [ctx.operand(args["self"], dtype)], attrs)


@lowering("aten.hardtanh.default", ftir="`ft.clamp`")
def _hardtanh(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    convert = float if dtype.is_float else int
    bounds = {"min": convert(args["min_val"]), "max": convert(args["max_val"])}
    return ctx.emit("ft.clamp", [ctx.value(args["self"])], bounds)


@lowering("aten.leaky_relu.default", ftir="`ft.where` (x > 0, x, x × slope)")
def _leaky_relu(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    dtype = x.type.dtype
    positive = ctx.emit("ft.gt", [x, ctx.scalar_tensor(0, dtype)])
    scaled = ctx.emit("ft.mul", [x, ctx.operand(args["negative_slope"], dtype)])
    return ctx.emit("ft.where", [positive, x, scaled])


@lowering("aten.elu.default", ftir="`ft.where` (x > 0, x × scale, expm1(x × input_scale) × alpha × scale)")
def _elu(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    dtype = x.type.dtype
    positive = ctx.emit("ft.gt", [x, ctx.scalar_tensor(0, dtype)])
    scale = ctx.operand(args["scale"], dtype)
    negative = ctx.emit("ft.expm1", [ctx.emit("ft.mul", [x, ctx.operand(args["input_scale"], dtype)])])
    negative = ctx.emit("ft.mul", [negative, ctx.operand(args["alpha"] * args["scale"], dtype)])
    return ctx.emit("ft.where", [positive, ctx.emit("ft.mul", [x, scale]), negative])


@lowering("aten.clamp.Tensor", ftir="`ft.maximum` / `ft.minimum`")
def _clamp_tensor(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    result = ctx.operand(args["self"], dtype)
    if args["min"] is not None:
        result = ctx.emit("ft.maximum", [result, ctx.operand(args["min"], dtype)])
    if args["max"] is not None:
        result = ctx.emit("ft.minimum", [result, ctx.operand(args["max"], dtype)])
    return result


@lowering("aten._to_copy.default", "prims.convert_element_type.default",
          ftir="`ft.cast` (none when only the device or layout changes)")
def _to_copy(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.operand(args.get("self", args.get("a")), ctx.dtype_of(node))  # a number (0.1): a 0-d constant


@lowering("aten.clone.default", "aten.alias.default", "aten.lift_fresh_copy.default", "aten.detach.default",
          ftir="none (the operand itself: FTIR values are immutable)")
def _identity(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.value(args["self"])


@lowering("aten.copy.default", ftir="`ft.cast` + `ft.broadcast_to` of the source")
def _copy(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    src = ctx.operand(args["src"], ctx.dtype_of(node))
    if src.type.shape == ctx.result_type(node).shape:
        return src
    return ctx.sized("ft.broadcast_to", [src], node)


# --------------------------------------------------------------------------- reductions


def _dims(dim: Any) -> tuple[int, ...]:
    """A reduction's dims attribute: () reduces all."""
    if dim is None:
        return ()
    if isinstance(dim, int):
        return (dim,)
    return tuple(dim)


def _reduce(ft_name: str, cast_input: bool) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        dtype = ctx.dtype_of(node)
        x = ctx.cast(ctx.value(args["self"]), dtype) if cast_input else ctx.value(args["self"])
        attrs = {"dims": _dims(args.get("dim")), "keepdim": bool(args.get("keepdim") or False)}
        if ft_name == "ft.var":
            correction = args.get("correction")
            attrs["correction"] = 1 if correction is None else correction
        return ctx.emit(ft_name, [x], attrs)

    return lower


_REDUCTIONS = {
    "sum": ("ft.sum", True, ("dim_IntList", "default")),
    "mean": ("ft.mean", True, ("dim", "default")),
    "prod": ("ft.prod", True, ("dim_int", "default")),
    "amax": ("ft.amax", False, ("default",)),
    "amin": ("ft.amin", False, ("default",)),
    "any": ("ft.any", False, ("dim", "dims", "default")),
    "all": ("ft.all", False, ("dim", "dims", "default")),
    "var": ("ft.var", False, ("correction",)),
}
for _name, (_ft, _cast, _overloads) in _REDUCTIONS.items():
    _doc = _code(_ft) + (" (input cast to the result dtype first)" if _cast else "")
    lowering(*(f"aten.{_name}.{o}" for o in _overloads), ftir=_doc)(_reduce(_ft, _cast))
lowering("aten.max.default", ftir="`ft.amax` over all dims")(_reduce("ft.amax", False))
lowering("aten.min.default", ftir="`ft.amin` over all dims")(_reduce("ft.amin", False))


@lowering("aten.var_mean.correction", ftir="`ft.var`, `ft.mean`")
def _var_mean(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    return [_reduce("ft.var", False)(ctx, node, args), _reduce("ft.mean", False)(ctx, node, args)]


def _arg_reduce(ft_name: str) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        x, dim, keepdim = ctx.value(args["self"]), args["dim"], bool(args["keepdim"])
        if dim is None:
            if keepdim or not x.type.is_static:
                raise Unmapped("argmax/argmin over all dims with keepdim or a dynamic shape")
            x, dim = ctx.emit("ft.reshape", [x], {}, TensorType((x.type.numel(),), x.type.dtype)), 0
        return ctx.emit(ft_name, [x], {"dim": dim, "keepdim": keepdim})

    return lower


lowering("aten.argmax.default", ftir="`ft.argmax`")(_arg_reduce("ft.argmax"))
lowering("aten.argmin.default", ftir="`ft.argmin`")(_arg_reduce("ft.argmin"))


def _value_and_index(reduce_name: str, arg_name: str) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
        x, dim, keepdim = ctx.value(args["self"]), args["dim"], bool(args["keepdim"])
        values = ctx.emit(reduce_name, [x], {"dims": (dim,), "keepdim": keepdim})
        return [values, ctx.emit(arg_name, [x], {"dim": dim, "keepdim": keepdim})]

    return lower


lowering("aten.max.dim", ftir="`ft.amax`, `ft.argmax`")(_value_and_index("ft.amax", "ft.argmax"))
lowering("aten.min.dim", ftir="`ft.amin`, `ft.argmin`")(_value_and_index("ft.amin", "ft.argmin"))


def _softmax(ft_name: str) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
        return ctx.emit(ft_name, [ctx.value(args["self"])], {"dim": args["dim"]}, ctx.result_type(node))

    return lower


lowering("aten._softmax.default", ftir="`ft.softmax` (result type carries half_to_float)")(_softmax("ft.softmax"))
lowering("aten._log_softmax.default", ftir="`ft.log_softmax`")(_softmax("ft.log_softmax"))


@lowering("aten.cumsum.default", ftir="`ft.cumsum` (input cast to the result dtype first)")
def _cumsum(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.emit("ft.cumsum", [ctx.cast(ctx.value(args["self"]), ctx.dtype_of(node))], {"dim": args["dim"]})


@lowering("aten.topk.default", ftir="`ft.topk`")
def _topk(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    if isinstance(args["k"], fx.Node):
        raise Unmapped("symbolic k")
    attrs = {"k": args["k"], "dim": args["dim"], "largest": bool(args["largest"]), "sorted": bool(args["sorted"])}
    return ctx.emit_op("ft.topk", [ctx.value(args["self"])], attrs).results


@lowering("aten.sort.default", "aten.sort.stable", ftir="`ft.sort`")
def _sort(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    attrs = {"dim": args["dim"], "descending": bool(args["descending"]), "stable": bool(args.get("stable"))}
    return ctx.emit_op("ft.sort", [ctx.value(args["self"])], attrs).results


# --------------------------------------------------------------------------- linear algebra


@lowering("aten.mm.default", "aten.bmm.default", ftir="`ft.matmul`")
def _mm(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.emit("ft.matmul", [ctx.value(args["self"]), ctx.value(args["mat2"])])


@lowering("aten.matmul.default", ftir="`ft.matmul` (both operands of rank ≥ 2)")
def _matmul(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    a, b = ctx.value(args["self"]), ctx.value(args["other"])
    if a.type.rank < 2 or b.type.rank < 2:
        raise Unmapped("matmul with a vector operand")
    return ctx.emit("ft.matmul", [a, b])


@lowering("aten.addmm.default", "aten.baddbmm.default",
          ftir="`ft.matmul` + `ft.add` (`ft.mul` for alpha/beta ≠ 1)")
def _addmm(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    mat1, mat2 = (args.get("mat1", args.get("batch1")), args.get("mat2", args.get("batch2")))
    product = ctx.emit("ft.matmul", [ctx.value(mat1), ctx.value(mat2)])
    if args["alpha"] != 1:
        product = ctx.emit("ft.mul", [product, ctx.operand(args["alpha"], dtype)])
    if args["beta"] == 0:
        return product
    bias = ctx.operand(args["self"], dtype)
    if args["beta"] != 1:
        bias = ctx.emit("ft.mul", [bias, ctx.operand(args["beta"], dtype)])
    return ctx.emit("ft.add", [product, bias])


@lowering("aten.convolution.default", ftir="`ft.conv`")
def _convolution(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    operands = [ctx.value(args["input"]), ctx.value(args["weight"])]
    if args["bias"] is not None:
        operands.append(ctx.value(args["bias"]))
    if any(isinstance(v, fx.Node) for k in ("stride", "padding", "dilation", "output_padding") for v in args[k]):
        raise Unmapped("symbolic convolution parameters")
    attrs = {k: tuple(args[k]) for k in ("stride", "padding", "dilation", "output_padding")}
    attrs |= {"transposed": bool(args["transposed"]), "groups": int(args["groups"])}
    return ctx.emit("ft.conv", operands, attrs, ctx.result_type(node))


# --------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class _FusedAttention:
    """How one fused-kernel aten op behind F.scaled_dot_product_attention spells ft.attention."""

    mask: str | None  # the schema name of its mask argument (None: it takes no mask)
    # ft.attention's `causal` when is_causal is set (the diagonal the kernel aligns to), or
    # "custom_mask_type" where that argument says it.
    causal: str
    heads_first: bool = True  # q, k, v are [B, H, S, D]; else [B, S, H, D]

    def causal_kind(self, args: dict[str, Any]) -> str:
        """ft.attention's `causal` for this call."""
        if self.causal != "custom_mask_type":
            return self.causal if args["is_causal"] else "none"
        if args["custom_mask_type"] not in range(len(_CUSTOM_MASK_TYPES)):
            raise Unmapped(f"custom_mask_type {args['custom_mask_type']}")
        return _CUSTOM_MASK_TYPES[args["custom_mask_type"]]

    def doc(self) -> str:
        """Its row in docs/importer.md."""
        causal = ("custom_mask_type 0/1/2 → causal none/upper_left/lower_right" if self.causal == "custom_mask_type"
                  else f"is_causal → causal = {self.causal}")
        layout = "" if self.heads_first else "; [B, S, H, D] operands and result transposed"
        mask = f"; `{self.mask}` of rank < 4 reshaped to rank 4" if self.mask else ""
        return f"`ft.attention`; {causal}{layout}{mask}; dropout, or a read logsumexp (training), falls back"


# xformers' NoCustomMask, CausalFromTopLeft, CausalFromBottomRight.
_CUSTOM_MASK_TYPES = ("none", "upper_left", "lower_right")
# SDPA picks one of these kernels while aot_autograd traces it (CPU: flash_attention_for_cpu; CUDA: flash,
# efficient or cuDNN; other devices: the overrideable op). CausalBias(lower_right) on CUDA calls flash directly
# with is_causal=True, which the flash kernel aligns to the bottom right (SDPA itself sends flash is_causal only
# when Sq == Skv, where both alignments agree), or _efficient_attention_forward with custom_mask_type 2.
_FUSED_ATTENTION = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default": _FusedAttention("attn_mask", "upper_left"),
    "aten._scaled_dot_product_flash_attention.default": _FusedAttention(None, "lower_right"),
    "aten._scaled_dot_product_efficient_attention.default": _FusedAttention("attn_bias", "upper_left"),
    "aten._scaled_dot_product_cudnn_attention.default": _FusedAttention("attn_bias", "upper_left"),
    "aten._scaled_dot_product_fused_attention_overrideable.default": _FusedAttention("attn_bias", "upper_left"),
    "aten._efficient_attention_forward.default": _FusedAttention("bias", "custom_mask_type", heads_first=False),
}
# _efficient_attention_forward's arguments ft.attention has no counterpart for (packed variable-length
# batches, a sliding window of its own convention).
_UNMAPPED_ATTENTION_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "seqlen_k", "window_size")


def _used_extra_results(node: fx.Node) -> list[str]:
    """The schema names of the results past the output (logsumexp, RNG state, ...) the graph reads."""
    returns = node.target._schema.returns
    used: set[int] = set()
    for user in node.users:
        if user.target is not operator.getitem:
            used |= set(range(len(returns)))
        elif user.users:
            used.add(user.args[1])
    return [returns[i].name for i in sorted(used) if i > 0]


def _mask_rank4(ctx: FXImporter, mask: Value) -> Value:
    """The mask with leading 1s up to rank 4 (SDPA broadcasts it against [B, H, Sq, Skv] from the right)."""
    if mask.type.rank == 4:
        return mask
    shape = (1,) * (4 - mask.type.rank) + mask.type.shape
    return ctx.emit("ft.reshape", [mask, *ctx.dims_of(mask)], {}, TensorType(shape, mask.type.dtype))


def _check_attention_mappable(node: fx.Node, args: dict[str, Any]) -> None:
    """Raise Unmapped where ft.attention cannot stand for the call."""
    if args["dropout_p"]:
        raise Unmapped(f"dropout (p={args['dropout_p']}) draws from torch's generator")
    if any(args.get(name) is not None for name in _UNMAPPED_ATTENTION_ARGS):
        raise Unmapped(f"one of {', '.join(_UNMAPPED_ATTENTION_ARGS)} is set")
    extra = _used_extra_results(node)
    if extra:
        raise Unmapped(f"its {', '.join(extra)} {'feeds' if len(extra) == 1 else 'feed'} the backward pass")


def _scaled_query(ctx: FXImporter, q: Value, query: fx.Node, scale: Any) -> tuple[Value, float, Value | None]:
    """q, ft.attention's scale attribute, and the run-time scale (None unless needed). A scale
    only run time knows (a SymFloat argument, or the default 1/sqrt(Dqk) of a symbolic head dim)
    multiplies q instead, and the attribute is 1."""
    if isinstance(scale, fx.Node):
        run_time = ctx.scalar_value(scale, F64)
    elif scale is None and q.type.shape[3] is None:
        (head_dim,) = ctx.sizes_of(query.meta["val"].shape[-1:])
        run_time = ctx.emit("ft.pow", [ctx.cast(head_dim, F64), ctx.scalar_value(-0.5, F64)])
    else:
        return q, float(1 / math.sqrt(q.type.shape[3]) if scale is None else scale), None
    return ctx.emit("ft.mul", [q, ctx.cast(run_time, q.type.dtype)]), 1.0, run_time


def _fused_attention(form: _FusedAttention) -> Lower:
    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value | None]:
        _check_attention_mappable(node, args)
        causal = form.causal_kind(args)
        q, k, v = (ctx.value(args[name]) for name in ("query", "key", "value"))
        if not form.heads_first:
            q, k, v = (_transpose_to(ctx, x, [0, 2, 1, 3]) for x in (q, k, v))
        q, scale, _ = _scaled_query(ctx, q, args["query"], args["scale"])
        mask = args[form.mask] if form.mask else None
        masks = [] if mask is None else [_mask_rank4(ctx, ctx.value(mask))]
        attrs = {"scale": scale, "causal": causal, "window": 0, "has_mask": bool(masks), "has_sinks": False}
        out = ctx.emit("ft.attention", [q, k, v, *masks], attrs)
        if not form.heads_first:
            out = _transpose_to(ctx, out, [0, 2, 1, 3])
        return [out] + [None] * (len(node.target._schema.returns) - 1)

    return lower


for _name, _form in _FUSED_ATTENTION.items():
    lowering(_name, ftir=_form.doc())(_fused_attention(_form))


def _training_attention_operands(ctx: FXImporter, args: dict[str, Any]) -> tuple[Value, list[Value], dict[str, Any],
                                                                                Value | None]:
    """q (scaled when only run time knows the scale), the mask and sinks operands, the attributes
    and the run-time scale of a flagtree::attention(_backward) call (frontend/training_attention.py)."""
    q, scale, run_time = _scaled_query(ctx, ctx.value(args["q"]), args["q"], args["scale"])
    optional = [] if args["mask"] is None else [_mask_rank4(ctx, ctx.value(args["mask"]))]
    if args["sinks"] is not None:
        optional.append(ctx.value(args["sinks"]))
    attrs = {"scale": scale, "causal": args["causal"], "window": args["window"], "has_mask": args["mask"] is not None,
             "has_sinks": args["sinks"] is not None}
    return q, optional, attrs, run_time


@lowering("flagtree.attention.default", ftir="`ft.attention` with `with_lse` (training; see "
          "frontend/training_attention.py)")
def _training_attention(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value | None]:
    q, optional, attrs, _ = _training_attention_operands(ctx, args)
    kv = [ctx.value(args[name]) for name in ("k", "v")]
    op = ctx.emit_op("ft.attention", [q, *kv, *optional], {**attrs, "with_lse": True})
    return list(op.results)


@lowering("flagtree.attention_backward.default", ftir="`ft.attention_grad` (q scaled by a run-time scale, "
          "and its gradient by the same, when only run time knows the scale)")
def _training_attention_backward(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value | None]:
    q, optional, attrs, run_time = _training_attention_operands(ctx, args)
    operands = [q, *(ctx.value(args[name]) for name in ("k", "v", "out", "grad_out", "lse"))]
    grad_q, *grads = ctx.emit_op("ft.attention_grad", [*operands, *optional], attrs).results
    if run_time is not None:  # the gradient of q·s with respect to q
        grad_q = ctx.emit("ft.mul", [grad_q, ctx.cast(run_time, grad_q.type.dtype)])
    return [grad_q, *grads] + ([] if attrs["has_sinks"] else [None])  # no sinks: an unused empty result


# --------------------------------------------------------------------------- shapes


@lowering("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.squeeze.default",
          "aten.squeeze.dim", "aten.squeeze.dims", "aten.unsqueeze.default", "aten.view_copy.default",
          ftir="`ft.reshape`")
def _reshape(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.sized("ft.reshape", [ctx.value(args["self"])], node)


@lowering("aten.expand.default", "aten.expand_copy.default", ftir="`ft.broadcast_to`")
def _expand(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.sized("ft.broadcast_to", [ctx.value(args["self"])], node)


def _transpose_to(ctx: FXImporter, x: Value, perm: list[int]) -> Value:
    rank = x.type.rank
    return ctx.emit("ft.transpose", [x], {"perm": tuple(p % rank for p in perm)})


@lowering("aten.permute.default", "aten.permute_copy.default", ftir="`ft.transpose`")
def _permute(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return _transpose_to(ctx, ctx.value(args["self"]), list(args["dims"]))


@lowering("aten.transpose.int", ftir="`ft.transpose`")
def _transpose(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    perm = list(range(x.type.rank))
    a, b = args["dim0"] % max(x.type.rank, 1), args["dim1"] % max(x.type.rank, 1)
    perm[a], perm[b] = perm[b], perm[a]
    return _transpose_to(ctx, x, perm)


@lowering("aten.t.default", ftir="`ft.transpose`")
def _t(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    return _transpose_to(ctx, x, [1, 0]) if x.type.rank == 2 else x


def _nonnegative(arg: Any) -> bool:
    expr = arg.meta["val"].node.expr if isinstance(arg, fx.Node) else sympy.Integer(arg)
    return bool(expr.is_nonnegative)


@lowering("aten.slice.Tensor", ftir="`ft.slice`; symbolic bounds: `ft.iota` + `ft.index`")
def _slice(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    dim = args["dim"] % x.type.rank
    start, end, step = args["start"], args["end"], args["step"]
    start = 0 if start is None else start
    end = SLICE_END if end is None else end
    if isinstance(step, fx.Node):
        raise Unmapped("symbolic slice step")
    if not isinstance(start, fx.Node) and not isinstance(end, fx.Node):
        return ctx.emit("ft.slice", [x], {"dim": dim, "start": start, "end": min(end, SLICE_END), "step": step})
    if not _nonnegative(start):
        raise Unmapped("symbolic slice with a possibly negative start")
    # x[start:end:step] along dim == x.index_select(dim, start + step * arange(length)); the
    # length (clamped like Python slices) is the result's dim, which torch computed for us.
    length = node.meta["val"].shape[dim]
    index_type = TensorType((ctx.result_type(node).shape[dim],), I64)
    indices = ctx.emit("ft.iota", ctx.sizes_of([length]), {"start": 0, "step": step}, index_type)
    if start != 0:
        indices = ctx.emit("ft.add", [indices, ctx.scalar_value(start, I64)])
    return ctx.emit("ft.index", [x, indices], {"dims": (dim,)}, ctx.result_type(node))


@lowering("aten.select.int", ftir="`ft.slice` + `ft.reshape`")
def _select(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x, index = ctx.value(args["self"]), args["index"]
    if isinstance(index, fx.Node):
        raise Unmapped("symbolic select index")
    dim = args["dim"] % x.type.rank
    end = SLICE_END if index == -1 else index + 1
    row = ctx.emit("ft.slice", [x], {"dim": dim, "start": index, "end": end, "step": 1})
    return ctx.sized("ft.reshape", [row], node)


@lowering("aten.cat.default", ftir="`ft.concat` (operands cast to the result dtype)")
def _cat(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    rank = ctx.result_type(node).rank
    # torch.cat skips legacy empty 1-d tensors when joining tensors of higher rank.
    parts = [ctx.operand(t, dtype) for t in args["tensors"]]
    parts = [p for p in parts if p.type.rank == rank]
    return ctx.emit("ft.concat", parts, {"dim": args["dim"] % rank})


def _split_at(ctx: FXImporter, x: Value, dim: int, sizes: list[int]) -> list[Value]:
    pieces, start = [], 0
    for size in sizes:
        pieces.append(ctx.emit("ft.slice", [x], {"dim": dim, "start": start, "end": start + size, "step": 1}))
        start += size
    return pieces


@lowering("aten.split_with_sizes.default", ftir="one `ft.slice` per piece")
def _split_with_sizes(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    x = ctx.value(args["self"])
    if any(isinstance(s, fx.Node) for s in args["split_sizes"]):
        raise Unmapped("symbolic split sizes")
    return _split_at(ctx, x, args["dim"] % x.type.rank, list(args["split_sizes"]))


@lowering("aten.split.Tensor", ftir="one `ft.slice` per piece")
def _split(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    x = ctx.value(args["self"])
    dim = args["dim"] % x.type.rank
    total, size = x.type.shape[dim], args["split_size"]
    if total is None or isinstance(size, fx.Node):
        raise Unmapped("split of a symbolic size")
    return _split_at(ctx, x, dim, [min(size, total - s) for s in range(0, total, size)] or [0])


@lowering("aten.unbind.int", ftir="one `ft.slice` + `ft.reshape` per piece")
def _unbind(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> list[Value]:
    x = ctx.value(args["self"])
    dim = args["dim"] % x.type.rank
    if x.type.shape[dim] is None:
        raise Unmapped("unbind of a symbolic dim")
    pieces = _split_at(ctx, x, dim, [1] * x.type.shape[dim])
    return [ctx.sized_like("ft.reshape", [p], val) for p, val in zip(pieces, node.meta["val"])]


@lowering("aten.constant_pad_nd.default", ftir="`ft.pad`")
def _pad(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    if any(isinstance(p, fx.Node) for p in args["pad"]):
        raise Unmapped("symbolic padding")
    dtype = ctx.dtype_of(node)
    value = args["value"]
    value = float(value) if dtype.is_float else int(value)
    return ctx.emit("ft.pad", [ctx.value(args["self"])], {"pad": tuple(args["pad"]), "value": value})


@lowering("aten.flip.default", ftir="`ft.flip`")
def _flip(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.emit("ft.flip", [ctx.value(args["self"])], {"dims": tuple(args["dims"])})


# --------------------------------------------------------------------------- gather / scatter / index


@lowering("aten.gather.default", ftir="`ft.gather`")
def _gather(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.emit("ft.gather", [ctx.value(args["self"]), ctx.value(args["index"])], {"dim": args["dim"]})


@lowering("aten.scatter.src", "aten.scatter.value", "aten.scatter_add.default", "aten.scatter.reduce",
          ftir="`ft.scatter` (a scalar source is broadcast to the index shape)")
def _scatter(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x, index = ctx.value(args["self"]), ctx.value(args["index"])
    reduce = "add" if node.target is torch.ops.aten.scatter_add.default else args.get("reduce") or "none"
    if reduce not in ("none", "add"):
        raise Unmapped(f"scatter with reduce='{reduce}'")
    src = args.get("src", args.get("value"))
    if isinstance(src, fx.Node):
        src_value = ctx.operand(src, x.type.dtype)
    else:
        scalar = ctx.scalar_tensor(src, x.type.dtype)
        src_value = ctx.emit("ft.broadcast_to", [scalar, *ctx.dims_of(index)], {}, index.type.with_dtype(x.type.dtype))
    return ctx.emit("ft.scatter", [x, index, src_value], {"dim": args["dim"], "reduce": reduce})


@lowering("aten.scatter_reduce.two", ftir="`ft.scatter` with reduce = \"add\" (reduce=\"sum\", include_self)")
def _scatter_reduce(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    if args["reduce"] != "sum" or not args["include_self"]:
        raise Unmapped(f"scatter_reduce with reduce='{args['reduce']}', include_self={args['include_self']}")
    x = ctx.value(args["self"])
    operands = [x, ctx.value(args["index"]), ctx.operand(args["src"], x.type.dtype)]
    return ctx.emit("ft.scatter", operands, {"dim": args["dim"], "reduce": "add"})


@lowering("aten.slice_scatter.default", ftir="`ft.iota` + `ft.index_put` (x[start:end:step] along dim = src)")
def _slice_scatter(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x, src = ctx.value(args["self"]), ctx.value(args["src"])
    dim = args["dim"] % x.type.rank
    start, step = args["start"] or 0, args["step"]
    if isinstance(start, fx.Node) or isinstance(step, fx.Node) or start < 0:
        raise Unmapped("slice_scatter with a symbolic or negative start or step")
    # The slice's positions: start + step * i for i < the source's size along dim.
    length = node.args[1].meta["val"].shape[dim]
    index_type = TensorType((src.type.shape[dim],), I64)
    indices = ctx.emit("ft.iota", ctx.sizes_of([length]), {"start": start, "step": step}, index_type)
    return ctx.emit("ft.index_put", [x, ctx.cast(src, x.type.dtype), indices], {"dims": (dim,), "accumulate": False})


def _index_operands(ctx: FXImporter, indices: list[Any]) -> tuple[tuple[int, ...], list[Value]]:
    dims = tuple(i for i, idx in enumerate(indices) if idx is not None)
    return dims, [ctx.value(indices[i]) for i in dims]


@lowering("aten.index.Tensor", ftir="`ft.index`")
def _index(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dims, indices = _index_operands(ctx, list(args["indices"]))
    return ctx.emit("ft.index", [ctx.value(args["self"]), *indices], {"dims": dims}, ctx.result_type(node))


@lowering("aten.index_put.default", ftir="`ft.index_put`")
def _index_put(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    dims, indices = _index_operands(ctx, list(args["indices"]))
    values = ctx.operand(args["values"], x.type.dtype)
    attrs = {"dims": dims, "accumulate": bool(args["accumulate"])}
    return ctx.emit("ft.index_put", [x, values, *indices], attrs)


@lowering("aten.index_select.default", ftir="`ft.index` on one dim")
def _index_select(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    x = ctx.value(args["self"])
    dims = (args["dim"] % max(x.type.rank, 1),)
    return ctx.emit("ft.index", [x, ctx.value(args["index"])], {"dims": dims}, ctx.result_type(node))


@lowering("aten.embedding.default", ftir="`ft.index` on dim 0")
def _embedding(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    weight, indices = ctx.value(args["weight"]), ctx.value(args["indices"])
    return ctx.emit("ft.index", [weight, indices], {"dims": (0,)}, ctx.result_type(node))


# --------------------------------------------------------------------------- creation


def _fill_value(value: Any, dtype: ScalarType) -> bool | int | float:
    if isinstance(value, fx.Node):
        raise Unmapped("symbolic fill value")
    if dtype.name == "i1":
        return bool(value)
    return float(value) if dtype.is_float else int(value)


@lowering("aten.full.default", "aten.full_like.default", ftir="`ft.full`")
def _full(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.sized("ft.full", [], node, {"value": _fill_value(args["fill_value"], ctx.dtype_of(node))})


@lowering("aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
          "aten.empty_permuted.default",
          ftir="`ft.full` of 0 (uninitialized memory may hold any value; zeros are one)")
def _empty(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return ctx.sized("ft.full", [], node, {"value": _fill_value(0, ctx.dtype_of(node))})


@lowering("aten.scalar_tensor.default", ftir="`ft.constant` (0-d dense)")
def _scalar_tensor(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    dtype = ctx.dtype_of(node)
    return ctx.scalar_tensor(_fill_value(args["s"], dtype), dtype)


def _iota(ctx: FXImporter, node: fx.Node, start: Any, step: Any) -> Value:
    if isinstance(step, fx.Node):
        raise Unmapped("symbolic arange step")
    if not isinstance(start, fx.Node):
        return ctx.sized("ft.iota", [], node, {"start": start, "step": step})
    # A symbolic start: iota from 0, then add the start (an i64 size).
    values = ctx.sized("ft.iota", [], node, {"start": 0, "step": step})
    if ctx.dtype_of(node) != I64:
        raise Unmapped("symbolic start of a non-i64 arange")
    return ctx.emit("ft.add", [values, ctx.scalar_value(start, I64)])


@lowering("aten.arange.start_step", "aten.arange.start", "aten.arange.default", ftir="`ft.iota`")
def _arange(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return _iota(ctx, node, args.get("start", 0), args.get("step", 1))


@lowering("prims.iota.default", ftir="`ft.iota`")
def _prims_iota(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value:
    return _iota(ctx, node, args["start"], args["step"])


# --------------------------------------------------------------------------- sizes and tuples


@lowering("aten.sym_size.int", ftir="`ft.dim` (nothing for a static dim)")
def _sym_size(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value | int:
    size = node.meta["val"]
    if isinstance(size, int):
        return size
    value = ctx.emit("ft.dim", [ctx.value(args["self"])], {"dim": args["dim"]})
    ctx.sizes.remember(size.node.expr, value)
    return value


def _scalar_arithmetic(ft_name: str) -> Lower:
    """Python arithmetic on symbolic sizes (SymInt → i64, SymFloat → f64 scalars)."""

    def lower(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value | int | float:
        result = node.meta["val"]
        if isinstance(result, (int, float)):
            return result
        dtype = ctx.result_type(node)
        value = ctx.emit(ft_name, [ctx.scalar_value(a, dtype) for a in node.args])
        ctx.sizes.remember(result.node.expr, value)
        return value

    return lower


for _op, _ft in ((operator.add, "ft.add"), (operator.mul, "ft.mul"), (operator.sub, "ft.sub"),
                 (operator.floordiv, "ft.floordiv"), (operator.mod, "ft.remainder"), (operator.neg, "ft.neg"),
                 (operator.truediv, "ft.div"), (operator.pow, "ft.pow"), (torch._sym_sqrt, "ft.sqrt")):
    lowering(target_name(_op), ftir=_code(_ft) + " on scalars (i64 sizes, f64)")(_scalar_arithmetic(_ft))


@lowering(target_name(torch.sym_float), ftir="`ft.cast` to f64")
def _sym_float(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Value | float:
    result = node.meta["val"]
    return result if isinstance(result, float) else ctx.scalar_value(node.args[0], F64)


@lowering(target_name(operator.getitem), ftir="none (picks one result of a multi-result op)")
def _getitem(ctx: FXImporter, node: fx.Node, args: dict[str, Any]) -> Any:
    source, index = node.args
    return ctx.values[source][index]
