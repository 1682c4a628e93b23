"""Every registered op's semantics, checked independently.

`CASES` has one entry per op: a hypothesis strategy for a random instance (operand
types, attributes, fresh random inputs) and an oracle that computes the expected results
independently of the op's `reference` implementation (NumPy, or torch in float64).  The
op runs alone in a module on the reference backend; its outputs must match the oracle
(relative L2 error within the dtype's tolerance, exact for integers, NaN only where the
oracle has NaN) and have exactly the shape and dtype `infer` gave the result.  A test
checks that `CASES` covers every registered op, so a new op without a test fails CI.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.reference.executor import run_module
from flagtree.errors import VerificationError
from flagtree.ir import Block, Builder, DenseAttr, Module, Region, ScalarType, TensorType, Value, new_function, verify
from flagtree.ir.builder import infer_result_types
from flagtree.ir.docs import ops_markdown
from flagtree.ir.opdef import all_ops, lookup
from flagtree.ir.parser import parse_module
from flagtree.ir.types import I64, Type, broadcast_shapes, types_compatible
from tests.strategies import seeds

FLOATS = ("f32", "bf16", "f16")
NUMERIC = (*FLOATS, "i64")
ALL = (*NUMERIC, "i1")
# Relative L2 error allowed against the float64 oracle (DESIGN.md, "Tests"); integers and i1 compare exactly.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
             torch.float8_e4m3fn: 0.0, torch.float8_e5m2: 0.0}  # fp8 cases use exactly representable values
DIMS = (1, 2, 3, 5, 17)


@dataclass
class Spec:
    """One instance of an op: its operand types, inputs, attributes and (when inference
    cannot know them) result types; `body` builds an ft.fusion region."""

    operand_types: list[Type]
    inputs: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    result_types: list[Type] | None = None
    body: Callable[[Builder, list[Value]], list[Value]] | None = None


Oracle = Callable[[list[Any], dict[str, Any], list[Type]], list[Any]]


@dataclass(frozen=True)
class Case:
    """`oracle(inputs, attributes, result types)` gives the expected results; a None entry
    is checked by `check(outputs, spec)` instead (e.g. top-k indices, ambiguous under ties)."""

    spec: Callable[[Callable], Spec]  # draw -> Spec
    oracle: Oracle
    check: Callable[[list[Any], Spec], None] | None = None
    dynamic: bool = True  # inference generalizes to `?` operand dims (test_infer_with_dynamic_dims...)
    retype: bool = True  # operands may take any element type (false: index operands must stay i64)


# ---------------------------------------------------------------- random instances


def _shape(draw, min_rank: int = 0, max_rank: int = 3) -> tuple[int, ...]:
    rank = draw(st.integers(min_rank, max_rank))
    return tuple(draw(st.sampled_from(DIMS)) for _ in range(rank))


def _tensor(draw, shape: tuple[int, ...], dtype: str, domain: str = "any") -> torch.Tensor:
    """A fresh random tensor (seeded by hypothesis so failures replay); never all zeros."""
    generator = torch.Generator().manual_seed(draw(seeds()))
    if dtype == "i1":
        return torch.rand(shape, generator=generator) < 0.5
    if dtype == "i64":
        low = 0 if domain == "small_nonneg" else 1
        magnitude = torch.randint(low, 4 if domain == "small_nonneg" else 10, shape, generator=generator)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1, 1)
        return magnitude if domain in ("small_nonneg", "positive") else magnitude * sign
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if domain == "positive":
        x = x.abs() + 0.1
    elif domain == "nonzero":
        x = torch.where(x < 0, x - 0.1, x + 0.1)
    elif domain == "small":
        x = x * 0.5
    elif domain == "near_one":
        x = torch.where(x < 0, -1.0, 1.0) * torch.exp(0.2 * torch.randn(shape, generator=generator))
    elif domain == "halves":  # exact .5 ties exercise round-half-to-even
        x = torch.round(x * 4) / 2
    elif domain == "special" and x.numel():
        flat = x.reshape(-1)
        picks = torch.randint(0, flat.numel(), (3,), generator=generator)
        flat[picks] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    return x.to(ScalarType(dtype).torch_dtype)


def _t(shape: tuple[int | None, ...], dtype: str) -> TensorType:
    return TensorType(tuple(shape), ScalarType(dtype))


def _broadcast_shapes(draw, count: int = 2) -> list[tuple[int, ...]]:
    """Shapes that broadcast together: suffixes of one full shape with some dims set to 1."""
    full = _shape(draw)
    shapes = []
    for _ in range(count):
        suffix = full[draw(st.integers(0, len(full))):]
        shapes.append(tuple(1 if draw(st.booleans()) and draw(st.booleans()) else d for d in suffix))
    shapes[draw(st.integers(0, count - 1))] = full  # keep the full shape present
    return shapes


def _dims_subset(draw, rank: int) -> tuple[int, ...]:
    chosen = draw(st.lists(st.integers(0, max(rank - 1, 0)), unique=True, max_size=rank))
    return tuple(d - rank if draw(st.booleans()) else d for d in chosen)


def _dim(draw, rank: int) -> int:
    d = draw(st.integers(0, rank - 1))
    return d - rank if draw(st.booleans()) else d


# ---------------------------------------------------------------- oracle helpers


def _np(x: Any) -> Any:
    """Inputs as float64 / int64 / bool NumPy arrays (exact for every tested dtype)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype.is_floating_point:
        return x.double().numpy()
    return x.numpy()


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float64 values (exact in float32) to bfloat16, nearest-even, by bit manipulation."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Correctly rounded conversion of float64 `x` to a float dtype, as float64."""
    if dtype == "f16":
        return np.asarray(x).astype(np.float16).astype(np.float64)
    if dtype == "bf16":
        return _bf16_round(np.asarray(x).astype(np.float32))
    return np.asarray(x).astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------- case families


def _unary(oracle: Callable[[np.ndarray], np.ndarray], dtypes=FLOATS, domain: str = "any",
           attributes: Callable[[Callable], dict] | None = None) -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(dtypes))
        shape = _shape(draw)
        attrs = attributes(draw) if attributes else {}
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype, domain)], attrs)

    return Case(spec, lambda inputs, attrs, types: [oracle(_np(inputs[0]), **attrs)])


def _binary(oracle: Callable[[Any, Any], Any], dtypes=NUMERIC, domains: tuple[str, str] = ("any", "any"),
            scalar: Callable[[int, int], Any] | None = None) -> Case:
    """Broadcasting binary op; `scalar` is the Python-int semantics when i64 scalars (symbolic
    sizes) are accepted."""

    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(dtypes))
        if scalar is not None and dtype == "i64" and draw(st.booleans()):
            values = [int(_tensor(draw, (), "i64", domains[i])) for i in range(2)]
            return Spec([I64, I64], values)
        a, b = _broadcast_shapes(draw)
        return Spec([_t(a, dtype), _t(b, dtype)],
                    [_tensor(draw, a, dtype, domains[0]), _tensor(draw, b, dtype, domains[1])])

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        if not isinstance(inputs[0], torch.Tensor):
            return [scalar(*inputs)]
        return [oracle(_np(inputs[0]), _np(inputs[1]))]

    return Case(spec, expected)


def _bool_arith(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Any, Any], Any]:
    """Integer arithmetic whose i1 form is the truth of the integer result (torch on bool)."""
    def oracle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if x.dtype == np.bool_:
            return fn(x.astype(np.int64), y.astype(np.int64)) != 0
        return fn(x, y)

    return oracle


def _trunc_div(x: Any, y: Any) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x / y
    quotient = np.trunc(np.true_divide(x, y))  # small integers: exact in float64
    return quotient.astype(np.int64) if isinstance(quotient, np.ndarray) else int(quotient)


def _floor_div(x: Any, y: Any) -> Any:
    quotient = np.floor(np.true_divide(x, y))
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return quotient
    return quotient.astype(np.int64) if isinstance(quotient, np.ndarray) else int(quotient)


def _remainder(x: Any, y: Any) -> Any:
    return x - _floor_div(x, y) * y


def _fmod(x: Any, y: Any) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return np.fmod(x, y)
    return x - _trunc_div(x, y) * y


def _reduction(oracle: Callable[..., np.ndarray], dtypes=NUMERIC, correction: bool = False,
               domain: str = "any") -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(dtypes))
        shape = _shape(draw, 1)
        attrs: dict[str, Any] = {"dims": _dims_subset(draw, len(shape)), "keepdim": draw(st.booleans())}
        if correction and draw(st.booleans()):
            attrs["correction"] = draw(st.sampled_from((0, 1, 0.5)))
        if correction:
            reduced = math.prod(shape[d] for d in attrs["dims"]) if attrs["dims"] else math.prod(shape)
            if reduced <= attrs.get("correction", 1):
                attrs["correction"] = 0  # keep the denominator positive
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype, domain)], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0])
        axis = tuple(d % x.ndim for d in attrs["dims"]) or tuple(range(x.ndim))
        kwargs = {"ddof": attrs.get("correction", 1)} if correction else {}
        return [oracle(x, axis=axis, keepdims=attrs["keepdim"], **kwargs)]

    return Case(spec, expected)


def _arg_reduce(np_fn: Callable) -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw, 1)
        attrs = {"dim": _dim(draw, len(shape)), "keepdim": draw(st.booleans())}
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0])
        index = np_fn(x, axis=attrs["dim"])  # NumPy also returns the first extremum
        return [np.expand_dims(index, attrs["dim"]) if attrs["keepdim"] else index]

    return Case(spec, expected)


def _softmax(log: bool) -> Case:
    def spec(draw) -> Spec:
        shape = _shape(draw, 1)
        source, result = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
        return Spec([_t(shape, source)], [_tensor(draw, shape, source)], {"dim": _dim(draw, len(shape))},
                    [_t(shape, result)])

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0])
        shifted = x - x.max(axis=attrs["dim"], keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=attrs["dim"], keepdims=True))
        return [shifted - log_sum if log else np.exp(shifted - log_sum)]

    return Case(spec, expected, dynamic=False)


# ---------------------------------------------------------------- individual cases


def _gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(torch.from_numpy(np.asarray(x / math.sqrt(2)))).numpy())


def _where_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        c, a, b = _broadcast_shapes(draw, 3)
        return Spec([_t(c, "i1"), _t(a, dtype), _t(b, dtype)],
                    [_tensor(draw, c, "i1"), _tensor(draw, a, dtype), _tensor(draw, b, dtype)])

    return Case(spec, lambda inputs, attrs, types: [np.where(*map(_np, inputs))])


def _clamp_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw)
        bound = st.integers(-2, 2) if dtype == "i64" else st.floats(-1.5, 1.5)
        attrs = {k: draw(bound) for k in ("min", "max") if draw(st.booleans())}
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0])
        if "min" in attrs:
            x = np.maximum(x, attrs["min"])
        if "max" in attrs:
            x = np.minimum(x, attrs["max"])
        return [x]

    return Case(spec, expected)


_FP8_EXACT = (0.0, 0.5, -1.0, 1.5, 2.0, -4.0, 0.25)  # representable in every fp8 format that has a sign


def _cast_case() -> Case:
    def spec(draw) -> Spec:
        shape = _shape(draw)
        source, target = draw(st.sampled_from(ALL)), draw(st.sampled_from((*ALL, "f8E4M3FN", "f8E5M2")))
        if target.startswith("f8"):
            source = draw(st.sampled_from(FLOATS))
            values = draw(st.lists(st.sampled_from(_FP8_EXACT), min_size=math.prod(shape), max_size=math.prod(shape)))
            x = torch.tensor(values, dtype=torch.float64).reshape(shape).to(ScalarType(source).torch_dtype)
        else:
            x = _tensor(draw, shape, source, "small" if target == "i64" else "any")
        return Spec([_t(shape, source)], [x], {}, [_t(shape, target)])

    return Case(spec, lambda inputs, attrs, types: [_cast_expected(inputs[0], types[0].dtype.name)], dynamic=False)


def _cast_expected(x: torch.Tensor, target: str) -> np.ndarray:
    value = _np(x)
    if target == "i1":
        return value != 0
    if target == "i64":
        return np.trunc(value).astype(np.int64)
    if target.startswith("f8"):
        return value.astype(np.float64)  # the inputs are exactly representable
    return _round_to(value.astype(np.float64), target)


def _topk_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw, 1)
        dim = _dim(draw, len(shape))
        attrs = {"k": draw(st.integers(0, shape[dim])), "dim": dim, "largest": draw(st.booleans()),
                 "sorted": draw(st.booleans())}
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        # Unsorted top-k may return its values in any order: `_check_topk` compares them as a set.
        return [_top_values(inputs[0], attrs) if attrs["sorted"] else None, None]

    return Case(spec, expected, _check_topk)


def _top_values(x: torch.Tensor, attrs: dict) -> np.ndarray:
    ordered = np.sort(_np(x), axis=attrs["dim"])
    if attrs["largest"]:
        ordered = np.flip(ordered, axis=attrs["dim"])
    return np.take(ordered, range(attrs["k"]), axis=attrs["dim"])


def _check_topk(outputs: list[Any], spec: Spec) -> None:
    """Indices point at the values and are distinct; the values are the oracle's as a set."""
    values, indices = outputs
    a = spec.attributes
    assert torch.equal(torch.gather(spec.inputs[0], a["dim"], indices), values), "indices do not point at values"
    assert bool((indices.sort(a["dim"]).values.diff(dim=a["dim"]) > 0).all()), "indices repeat"
    in_order = values.sort(a["dim"], descending=a["largest"]).values
    assert np.array_equal(_np(in_order), _top_values(spec.inputs[0], a)), "not the k extreme values"


def _sort_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw, 1)
        attrs = {"dim": _dim(draw, len(shape)), "descending": draw(st.booleans()), "stable": True}
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0])
        keys = -x if attrs["descending"] else x
        indices = np.argsort(keys, axis=attrs["dim"], kind="stable")  # ties keep their order
        return [np.take_along_axis(x, indices, attrs["dim"]), indices]

    return Case(spec, expected)


def _cumsum_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(("f32", "i64")))
        shape = _shape(draw, 1)
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], {"dim": _dim(draw, len(shape))})

    return Case(spec, lambda inputs, attrs, types: [np.cumsum(_np(inputs[0]), axis=attrs["dim"])])


def _shape_op(spec_attrs: Callable[[Callable, tuple[int, ...]], dict], oracle: Callable[[np.ndarray, dict], Any],
              min_rank: int = 1, dtypes=ALL) -> Case:
    """A one-operand data-movement op: exact results for every dtype."""
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(dtypes))
        shape = _shape(draw, min_rank)
        return Spec([_t(shape, dtype)], [_tensor(draw, shape, dtype)], spec_attrs(draw, shape))

    return Case(spec, lambda inputs, attrs, types: [oracle(_np(inputs[0]), attrs)])


def _transpose_attrs(draw, shape) -> dict:
    return {"perm": tuple(draw(st.permutations(range(len(shape)))))}


def _slice_attrs(draw, shape) -> dict:
    bound = st.integers(-7, 7)
    return {"dim": _dim(draw, len(shape)), "start": draw(bound), "end": draw(bound), "step": draw(st.integers(1, 3))}


def _slice_oracle(x: np.ndarray, a: dict) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[a["dim"]] = slice(a["start"], a["end"], a["step"])
    return x[tuple(index)]


def _pad_attrs(draw, shape) -> dict:
    pairs = draw(st.integers(1, len(shape)))
    pad = []
    for i in range(pairs):
        size = shape[len(shape) - 1 - i]
        before = draw(st.integers(-(size - 1) // 2, 2))  # negative pads crop, keeping >= 1 element
        pad += [before, draw(st.integers(-(size - 1) // 2, 2))]
    return {"pad": tuple(pad), "value": draw(st.sampled_from((0, 1, -1)))}


def _pad_oracle(x: np.ndarray, a: dict) -> np.ndarray:
    pad = a["pad"]
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        before, after = pad[2 * i], pad[2 * i + 1]
        widths = [(0, 0)] * x.ndim
        widths[axis] = (max(before, 0), max(after, 0))
        x = np.pad(x, widths, constant_values=a["value"])
        index = [slice(None)] * x.ndim
        index[axis] = slice(max(-before, 0), x.shape[axis] - max(-after, 0))
        x = x[tuple(index)]
    return x


def _flip_attrs(draw, shape) -> dict:
    return {"dims": _dims_subset(draw, len(shape))}


def _dim_case() -> Case:
    def spec(draw) -> Spec:
        shape = _shape(draw, 1)
        return Spec([_t(shape, "f32")], [_tensor(draw, shape, "f32")], {"dim": _dim(draw, len(shape))})

    return Case(spec, lambda inputs, attrs, types: [inputs[0].shape[attrs["dim"]]])


def _reshape_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        shape = _shape(draw)
        target = list(draw(st.permutations([*shape, 1])))
        dynamic = draw(st.integers(-1, len(target) - 1))  # -1: fully static
        result = tuple(None if i == dynamic else d for i, d in enumerate(target))
        sizes = [target[dynamic]] if dynamic >= 0 else []
        return Spec([_t(shape, dtype), *[I64] * len(sizes)], [_tensor(draw, shape, dtype), *sizes], {},
                    [_t(result, dtype)])

    return Case(spec, lambda inputs, attrs, types: [_np(inputs[0]).reshape(_runtime(types[0], inputs[1:]))],
                dynamic=False)


def _runtime(result: TensorType, sizes: list[int]) -> tuple[int, ...]:
    """A sized op's output shape: the result type's static dims, its `?` dims from the size operands."""
    it = iter(sizes)
    return tuple(next(it) if d is None else d for d in result.shape)


def _broadcast_to_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        (source,) = _broadcast_shapes(draw, 1)
        source = tuple(1 if draw(st.booleans()) else d for d in source)
        lead = tuple(draw(st.lists(st.sampled_from(DIMS), max_size=2)))
        target = lead + tuple(draw(st.sampled_from(DIMS)) if d == 1 else d for d in source)
        dynamic = draw(st.integers(-1, len(target) - 1))
        result = tuple(None if i == dynamic else d for i, d in enumerate(target))
        sizes = [target[dynamic]] if dynamic >= 0 else []
        return Spec([_t(source, dtype), *[I64] * len(sizes)], [_tensor(draw, source, dtype), *sizes], {},
                    [_t(result, dtype)])

    return Case(spec, lambda inputs, attrs, types: [np.broadcast_to(_np(inputs[0]), _runtime(types[0], inputs[1:]))],
                dynamic=False)


def _concat_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        shape = _shape(draw, 1)
        dim = _dim(draw, len(shape))
        shapes = []
        for _ in range(draw(st.integers(1, 3))):
            part = list(shape)
            part[dim] = draw(st.sampled_from(DIMS))
            shapes.append(tuple(part))
        return Spec([_t(s, dtype) for s in shapes], [_tensor(draw, s, dtype) for s in shapes], {"dim": dim})

    return Case(spec, lambda inputs, attrs, types: [np.concatenate([_np(x) for x in inputs], axis=attrs["dim"])])


def _gather_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        shape = _shape(draw, 1)
        dim = _dim(draw, len(shape))
        index_shape = tuple(draw(st.integers(1, d)) if i != dim % len(shape) else draw(st.sampled_from(DIMS))
                            for i, d in enumerate(shape))
        generator = torch.Generator().manual_seed(draw(seeds()))
        index = torch.randint(0, shape[dim], index_shape, generator=generator)
        return Spec([_t(shape, dtype), _t(index_shape, "i64")], [_tensor(draw, shape, dtype), index], {"dim": dim})

    return Case(spec, lambda inputs, attrs, types: [_gather(_np(inputs[0]), _np(inputs[1]), attrs["dim"])],
                retype=False)


def _gather(x: np.ndarray, index: np.ndarray, dim: int) -> np.ndarray:
    out = np.empty(index.shape, dtype=x.dtype)
    for position in np.ndindex(*index.shape):
        source = list(position)
        source[dim] = index[position]
        out[position] = x[tuple(source)]
    return out


def _scatter_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw, 1)
        dim = _dim(draw, len(shape))
        reduce = draw(st.sampled_from(("none", "add")))
        index_shape = tuple(draw(st.integers(1, d)) for d in shape)
        generator = torch.Generator().manual_seed(draw(seeds()))
        if reduce == "none":  # distinct targets along dim: overlapping writes have no defined winner
            keys = torch.rand((*index_shape[:dim % len(shape)], shape[dim], *index_shape[dim % len(shape) + 1:]),
                              generator=generator)
            index = keys.argsort(dim=dim).narrow(dim, 0, index_shape[dim])
        else:
            index = torch.randint(0, shape[dim], index_shape, generator=generator)
        return Spec([_t(shape, dtype), _t(index_shape, "i64"), _t(index_shape, dtype)],
                    [_tensor(draw, shape, dtype), index, _tensor(draw, index_shape, dtype)],
                    {"dim": dim, "reduce": reduce})

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x, index, src = (_np(t).copy() for t in inputs)
        dim = attrs["dim"] % x.ndim
        for position in np.ndindex(*index.shape):
            target = list(position)
            target[dim] = index[position]
            if attrs["reduce"] == "add":
                x[tuple(target)] += src[position]
            else:
                x[tuple(target)] = src[position]
        return [x]

    return Case(spec, expected, dynamic=False, retype=False)


def _index_case(put: bool) -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = _shape(draw, 1)
        dims = tuple(sorted(draw(st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1, max_size=2))))
        generator = torch.Generator().manual_seed(draw(seeds()))
        count = draw(st.integers(1, min(shape[d] for d in dims)))
        # Distinct index rows, so index_put's overwrites never collide.
        indices = [torch.randperm(shape[d], generator=generator)[:count] for d in dims]
        index_types = [_t((count,), "i64") for _ in dims]
        x = _tensor(draw, shape, dtype)
        expected_shape = _np(x)[_numpy_index(dims, [_np(i) for i in indices], len(shape))].shape
        if not put:
            return Spec([_t(shape, dtype), *index_types], [x, *indices], {"dims": dims}, [_t(expected_shape, dtype)])
        values = _tensor(draw, expected_shape, dtype)
        attrs = {"dims": dims, "accumulate": draw(st.booleans())}
        return Spec([_t(shape, dtype), _t(expected_shape, dtype), *index_types], [x, values, *indices], attrs)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x = _np(inputs[0]).copy()
        if not put:
            return [x[_numpy_index(attrs["dims"], [_np(i) for i in inputs[1:]], x.ndim)]]
        where = _numpy_index(attrs["dims"], [_np(i) for i in inputs[2:]], x.ndim)
        if attrs["accumulate"]:
            np.add.at(x, where, _np(inputs[1]))
        else:
            x[where] = _np(inputs[1])
        return [x]

    return Case(spec, expected, dynamic=False, retype=False)


def _numpy_index(dims: tuple[int, ...], indices: list[np.ndarray], rank: int) -> tuple:
    full: list[Any] = [slice(None)] * (max(dims) + 1)
    for d, index in zip(dims, indices):
        full[d] = index
    return tuple(full)


def _full_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(ALL))
        shape = _shape(draw)
        value = {"i1": st.booleans(), "i64": st.integers(-9, 9)}.get(dtype, st.floats(-10, 10))
        dynamic = draw(st.integers(-1, len(shape) - 1))
        result = tuple(None if i == dynamic else d for i, d in enumerate(shape))
        sizes = [shape[dynamic]] if dynamic >= 0 else []
        return Spec([I64] * len(sizes), sizes, {"value": draw(value)}, [_t(result, dtype)])

    return Case(spec, lambda inputs, attrs, types: [np.full(_runtime(types[0], inputs), attrs["value"])],
                dynamic=False)


def _iota_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(NUMERIC))
        n = draw(st.sampled_from(DIMS))
        integral = dtype == "i64" or draw(st.booleans())
        number = st.integers(-5, 5) if integral else st.floats(-3, 3)
        attrs = {"start": draw(number), "step": draw(number)}
        if draw(st.booleans()):
            return Spec([I64], [n], attrs, [_t((None,), dtype)])
        return Spec([], [], attrs, [_t((n,), dtype)])

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        (n,) = _runtime(types[0], inputs)
        return [np.array([attrs["start"] + i * attrs["step"] for i in range(n)])]

    return Case(spec, expected, dynamic=False)


def _constant_case() -> Case:
    def spec(draw) -> Spec:
        if draw(st.booleans()):
            kind = draw(st.sampled_from(("f32", "i64", "i1")))
            value = {"f32": st.floats(-1e6, 1e6), "i64": st.integers(-(2**63), 2**63 - 1), "i1": st.booleans()}[kind]
            return Spec([], [], {"value": draw(value)}, [ScalarType(kind)])
        dtype = draw(st.sampled_from(ALL))
        shape = _shape(draw)
        return Spec([], [], {"value": DenseAttr(_tensor(draw, shape, dtype))}, [_t(shape, dtype)])

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        value = attrs["value"]
        return [_np(value.value) if isinstance(value, DenseAttr) else value]

    return Case(spec, expected, dynamic=False)


def _matmul_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(FLOATS))
        batch_a, batch_b = _broadcast_shapes(draw)
        batch_a, batch_b = batch_a[-2:], batch_b[-2:]
        m, k, n = (draw(st.sampled_from(DIMS)) for _ in range(3))
        a, b = (*batch_a, m, k), (*batch_b, k, n)
        return Spec([_t(a, dtype), _t(b, dtype)], [_tensor(draw, a, dtype), _tensor(draw, b, dtype)])

    return Case(spec, lambda inputs, attrs, types: [np.matmul(_np(inputs[0]), _np(inputs[1]))])


def _gather_matmul_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(FLOATS))
        entries, m, k, n, experts = (draw(st.sampled_from(DIMS)) for _ in range(5))
        transpose_w, x_repeat = draw(st.booleans()), draw(st.sampled_from((1, 2, 3)))
        batch = entries * x_repeat
        generator = torch.Generator().manual_seed(draw(seeds()))
        # Negative entries count from the end, as in aten.index.
        index = torch.randint(-experts, experts, (batch,), generator=generator)
        x, w = (entries, m, k), (experts, n, k) if transpose_w else (experts, k, n)
        attributes = {"transpose_w": True} if transpose_w else {}
        if x_repeat > 1:
            attributes["x_repeat"] = x_repeat
        return Spec([_t(x, dtype), _t(w, dtype), _t((batch,), "i64")],
                    [_tensor(draw, x, dtype), _tensor(draw, w, dtype), index], attributes)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x, w, index = (_np(t) for t in inputs)
        repeat = attrs.get("x_repeat", 1)
        weights = [w[e].T if attrs.get("transpose_w", False) else w[e] for e in index]
        return [np.stack([x[b // repeat] @ weights[b] for b in range(len(index))])]

    return Case(spec, expected, retype=False)


def _conv_case() -> Case:
    def spec(draw) -> Spec:
        spatial = draw(st.integers(1, 2))
        groups = draw(st.sampled_from((1, 2)))
        channels_in, channels_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        transposed = draw(st.booleans())
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
        size = tuple(draw(st.integers(5, 9)) for _ in range(spatial))  # >= the dilated kernel (5)
        attrs = {
            "stride": tuple(draw(st.integers(1, 2)) for _ in range(spatial)),
            "padding": tuple(draw(st.integers(0, 1)) for _ in range(spatial)),
            "dilation": tuple(draw(st.integers(1, 2)) for _ in range(spatial)),
            "groups": groups, "transposed": transposed, "output_padding": (0,) * spatial,
        }
        x_shape = (2, channels_in, *size)
        w_shape = (channels_in, channels_out // groups, *kernel) if transposed else (
            channels_out, channels_in // groups, *kernel)
        types = [_t(x_shape, "f32"), _t(w_shape, "f32")]
        inputs = [_tensor(draw, x_shape, "f32"), _tensor(draw, w_shape, "f32")]
        if draw(st.booleans()):
            types.append(_t((channels_out,), "f32"))
            inputs.append(_tensor(draw, (channels_out,), "f32"))
        out = _conv_expected(inputs, attrs)
        return Spec(types, inputs, attrs, [_t(out.shape, "f32")])

    return Case(spec, lambda inputs, attrs, types: [_conv_expected(inputs, attrs)], dynamic=False)


def _conv_expected(inputs: list[torch.Tensor], a: dict) -> np.ndarray:
    """torch.nn.functional's convolutions in float64 (not aten.convolution, which the op calls)."""
    x, w, *bias = (t.double() for t in inputs)
    spatial = x.dim() - 2
    common = {"bias": bias[0] if bias else None, "stride": a["stride"], "padding": a["padding"],
              "dilation": a["dilation"], "groups": a["groups"]}
    if a["transposed"]:
        fn = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d)[spatial - 1]
        return fn(x, w, output_padding=a["output_padding"], **common).numpy()
    return (torch.nn.functional.conv1d, torch.nn.functional.conv2d)[spatial - 1](x, w, **common).numpy()


def _torch_call_case() -> Case:
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(FLOATS))
        a, b = _broadcast_shapes(draw)
        alpha = draw(st.sampled_from((1, 2, -0.5)))
        attrs = {"target": "aten::add.Tensor", "args": [{"operand": 0}, {"operand": 1}], "kwargs": {"alpha": alpha}}
        out = _t(broadcast_shapes(a, b), dtype)
        return Spec([_t(a, dtype), _t(b, dtype)], [_tensor(draw, a, dtype), _tensor(draw, b, dtype)], attrs, [out])

    return Case(spec, lambda inputs, attrs, types: [_np(inputs[0]) + attrs["kwargs"]["alpha"] * _np(inputs[1])],
                dynamic=False)


def _exp_times(builder: Builder, args: list[Value]) -> list[Value]:
    x, y = args
    product = builder.value("ft.mul", builder.value("ft.exp", x), y)
    return [product, builder.value("ft.neg", y)]


def _region_case(outputs: int) -> Case:
    """ft.fusion (one result) and ft.yield (two results): the region computes exp(x) * y, -y."""
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(FLOATS))
        shape = _shape(draw)
        body = _exp_times if outputs == 2 else (lambda b, args: _exp_times(b, args)[:1])
        return Spec([_t(shape, dtype)] * 2, [_tensor(draw, shape, dtype), _tensor(draw, shape, dtype)], {},
                    None, body)

    def expected(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
        x, y = map(_np, inputs)
        return [np.exp(x) * y, -y][:outputs]

    return Case(spec, expected, dynamic=False)


def _return_case() -> Case:
    def spec(draw) -> Spec:
        types = [_t(_shape(draw), draw(st.sampled_from(ALL))) for _ in range(draw(st.integers(0, 3)))]
        return Spec(types, [_tensor(draw, t.shape, t.dtype.name) for t in types])

    return Case(spec, lambda inputs, attrs, types: [_np(x) for x in inputs], dynamic=False)


def _attention_operands(draw, dtype: str) -> tuple[list[TensorType], list[Any], dict]:
    """Random GQA shapes, causal kinds, windows, bool or additive masks: q, k, v, [mask]."""
    batch, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    sq, skv = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    dqk, dv = draw(st.sampled_from((1, 4))), draw(st.sampled_from((1, 3)))
    heads = kv_heads * group
    causal = draw(st.sampled_from(("none", "upper_left", "lower_right")))
    mask_dtype = draw(st.sampled_from((None, "i1", dtype)))
    attrs = {"scale": draw(st.sampled_from((0.5, 1.0))), "causal": causal,
             "window": 0 if causal == "none" else draw(st.integers(0, 3)), "has_mask": mask_dtype is not None}
    shapes = [(batch, heads, sq, dqk), (batch, kv_heads, skv, dqk), (batch, kv_heads, skv, dv)]
    dtypes = [dtype] * 3
    if mask_dtype:
        shapes.append((1, draw(st.sampled_from((1, heads))), sq, skv))
        dtypes.append(mask_dtype)
    return [_t(s, d) for s, d in zip(shapes, dtypes)], [_tensor(draw, s, d) for s, d in zip(shapes, dtypes)], attrs


def _attention_case() -> Case:
    """ft.attention on random problems, with sinks or not, returning its lse or not."""
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(("f32", "f64")))
        types, inputs, attrs = _attention_operands(draw, dtype)
        attrs |= {"has_sinks": draw(st.booleans()), "with_lse": draw(st.booleans())}
        if attrs["has_sinks"]:
            heads = types[0].shape[1]
            types.append(_t((heads,), dtype))
            inputs.append(_tensor(draw, (heads,), dtype))
        return Spec(types, inputs, attrs)

    return Case(spec, _attention_oracle, dynamic=False)


def _visible_scores(q, k, mask, attrs: dict, b: int, h: int, i: int) -> list[tuple[int, float]]:
    """(key, scaled and masked score) of each key query row (b, h, i) sees, from ft.attention's definition."""
    sq, skv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    offset = {"none": None, "upper_left": 0, "lower_right": skv - sq}[attrs["causal"]]
    scores = []
    for j in range(skv):
        if offset is not None and (j > i + offset or (attrs["window"] and i + offset - j >= attrs["window"])):
            continue
        score = attrs["scale"] * float(q[b, h, i] @ k[b, h // group, j])
        if mask is not None:
            m = mask[0, h % mask.shape[1], i, j]
            if mask.dtype == bool and not m:
                continue
            score += 0.0 if mask.dtype == bool else m
        scores.append((j, score))
    return scores


def _attention_oracle(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
    """ft.attention from its definition, one query row at a time, in float64."""
    q, k, v = map(_np, inputs[:3])
    mask = _np(inputs[3]) if attrs["has_mask"] else None
    sinks = _np(inputs[-1]) if attrs["has_sinks"] else None
    batch, heads, sq, _ = q.shape
    group = heads // k.shape[1]
    out = np.zeros((batch, heads, sq, v.shape[3]))
    lse = np.full((batch, heads, sq), np.inf)
    for b, h, i in np.ndindex(batch, heads, sq):
        visible = _visible_scores(q, k, mask, attrs, b, h, i)
        logits = [score for _, score in visible]
        values = [v[b, h // group, j] for j, _ in visible]
        if sinks is not None:
            logits.append(sinks[h])
            values.append(np.zeros(v.shape[3]))
        if logits:
            weights = np.exp(np.array(logits) - max(logits))
            out[b, h, i] = weights @ np.array(values) / weights.sum()
            lse[b, h, i] = max(logits) + np.log(weights.sum())
    return [out, lse] if attrs.get("with_lse", False) else [out]


def _attention_grad_case() -> Case:
    """ft.attention_grad at the forward's own out and lse (from the oracle), a random grad_out,
    with sinks or not."""
    def spec(draw) -> Spec:
        dtype = draw(st.sampled_from(("f32", "f64")))
        types, inputs, attrs = _attention_operands(draw, dtype)
        attrs["has_sinks"] = draw(st.booleans())
        if attrs["has_sinks"]:
            heads = types[0].shape[1]
            types.append(_t((heads,), dtype))
            inputs.append(_tensor(draw, (heads,), dtype))
        out, lse = _attention_oracle(inputs, {**attrs, "with_lse": True}, [])
        torch_dtype = torch.float32 if dtype == "f32" else torch.float64
        out, lse = torch.from_numpy(out).to(torch_dtype), torch.from_numpy(lse).to(torch_dtype)
        grad_out = _tensor(draw, tuple(out.shape), dtype)
        new_types = [_t(tuple(out.shape), dtype), _t(tuple(out.shape), dtype), _t(tuple(lse.shape), dtype)]
        return Spec([*types[:3], *new_types, *types[3:]], [*inputs[:3], out, grad_out, lse, *inputs[3:]], attrs)

    return Case(spec, _attention_grad_oracle, dynamic=False)


def _attention_grad_oracle(inputs: list[Any], attrs: dict, types: list[Type]) -> list[Any]:
    """The gradients from their formulas, row by row in float64: p_j = exp(s_j − lse_i) on the
    visible keys, D_i = grad_out_i · out_i, grad_s_j = p_j (grad_out_i · v_j − D_i), and a
    sink's gradient −Σ_i exp(sink − lse_i) D_i."""
    q, k, v, out, grad_out, lse = map(_np, inputs[:6])
    mask = _np(inputs[6]) if attrs["has_mask"] else None
    sinks = _np(inputs[-1]) if attrs["has_sinks"] else None
    group = q.shape[1] // k.shape[1]
    grads = [np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)] + ([np.zeros(q.shape[1])] if attrs["has_sinks"]
                                                                         else [])
    for b, h, i in np.ndindex(*q.shape[:3]):
        row_dot = grad_out[b, h, i] @ out[b, h, i]
        if sinks is not None:
            grads[3][h] -= np.exp(sinks[h] - lse[b, h, i]) * row_dot
        for j, score in _visible_scores(q, k, mask, attrs, b, h, i):
            p = np.exp(score - lse[b, h, i])
            grad_s = p * (grad_out[b, h, i] @ v[b, h // group, j] - row_dot)
            grads[0][b, h, i] += attrs["scale"] * grad_s * k[b, h // group, j]
            grads[1][b, h // group, j] += attrs["scale"] * grad_s * q[b, h, i]
            grads[2][b, h // group, j] += p * grad_out[b, h, i]
    return grads


CASES: dict[str, Case] = {
    # unary floating-point math
    "ft.exp": _unary(np.exp),
    "ft.exp2": _unary(np.exp2),
    "ft.log": _unary(np.log, domain="positive"),
    "ft.log2": _unary(np.log2, domain="positive"),
    "ft.log1p": _unary(np.log1p, domain="positive"),
    "ft.expm1": _unary(np.expm1),
    "ft.sqrt": _unary(np.sqrt, domain="positive"),
    "ft.rsqrt": _unary(lambda x: 1 / np.sqrt(x), domain="positive"),
    "ft.sin": _unary(np.sin),
    "ft.cos": _unary(np.cos),
    "ft.tan": _unary(np.tan, domain="small"),
    "ft.tanh": _unary(np.tanh),
    "ft.atan": _unary(np.arctan),
    "ft.sigmoid": _unary(lambda x: 1 / (1 + np.exp(-x))),
    "ft.silu": _unary(lambda x: x / (1 + np.exp(-x))),
    "ft.erf": _unary(lambda x: torch.erf(torch.from_numpy(x)).numpy()),
    "ft.reciprocal": _unary(lambda x: 1 / x, domain="nonzero"),
    "ft.floor": _unary(np.floor, domain="halves"),
    "ft.ceil": _unary(np.ceil, domain="halves"),
    "ft.round": _unary(np.round, domain="halves"),  # NumPy rounds half to even too
    "ft.trunc": _unary(np.trunc, domain="halves"),
    "ft.gelu": _unary(_gelu, attributes=lambda draw: {"approximate": draw(st.sampled_from(("none", "tanh")))}
                      if draw(st.booleans()) else {}),
    # unary, any numeric type
    "ft.neg": _unary(np.negative, NUMERIC),
    "ft.abs": _unary(np.abs, NUMERIC),
    "ft.relu": _unary(lambda x: np.maximum(x, 0).astype(x.dtype), NUMERIC),
    "ft.sign": _unary(lambda x: x if x.dtype == np.bool_ else np.sign(x), ALL),
    "ft.bitwise_not": _unary(np.invert, ("i64", "i1")),
    "ft.isnan": _unary(np.isnan, FLOATS, "special"),
    "ft.isinf": _unary(np.isinf, FLOATS, "special"),
    "ft.logical_not": _unary(lambda x: x == 0, ALL),
    # binary arithmetic (i64 scalars are symbolic sizes)
    "ft.add": _binary(_bool_arith(np.add), ALL, scalar=operator.add),
    "ft.sub": _binary(np.subtract, scalar=operator.sub),
    "ft.mul": _binary(_bool_arith(np.multiply), ALL, scalar=operator.mul),
    "ft.div": _binary(_trunc_div, domains=("any", "nonzero"), scalar=_trunc_div),
    "ft.floordiv": _binary(_floor_div, domains=("any", "nonzero"), scalar=operator.floordiv),
    "ft.remainder": _binary(_remainder, domains=("any", "nonzero"), scalar=operator.mod),
    "ft.fmod": _binary(_fmod, domains=("any", "nonzero"), scalar=_fmod),
    "ft.pow": _binary(np.power, domains=("positive", "small_nonneg"), scalar=operator.pow),
    "ft.maximum": _binary(np.maximum, ALL, scalar=max),
    "ft.minimum": _binary(np.minimum, ALL, scalar=min),
    "ft.atan2": _binary(np.arctan2, FLOATS),
    "ft.bitwise_and": _binary(np.bitwise_and, ("i64", "i1"), scalar=operator.and_),
    "ft.bitwise_or": _binary(np.bitwise_or, ("i64", "i1"), scalar=operator.or_),
    "ft.bitwise_xor": _binary(np.bitwise_xor, ("i64", "i1"), scalar=operator.xor),
    # comparisons and logic
    "ft.eq": _binary(np.equal, ALL, scalar=operator.eq),
    "ft.ne": _binary(np.not_equal, ALL, scalar=operator.ne),
    "ft.lt": _binary(np.less, ALL, scalar=operator.lt),
    "ft.le": _binary(np.less_equal, ALL, scalar=operator.le),
    "ft.gt": _binary(np.greater, ALL, scalar=operator.gt),
    "ft.ge": _binary(np.greater_equal, ALL, scalar=operator.ge),
    "ft.logical_and": _binary(lambda x, y: (x != 0) & (y != 0), ALL),
    "ft.logical_or": _binary(lambda x, y: (x != 0) | (y != 0), ALL),
    "ft.logical_xor": _binary(lambda x, y: (x != 0) ^ (y != 0), ALL),
    "ft.where": _where_case(),
    "ft.clamp": _clamp_case(),
    "ft.cast": _cast_case(),
    # reductions
    "ft.sum": _reduction(np.sum),
    "ft.prod": _reduction(np.prod, domain="near_one"),  # long products of randn leave fp16's range
    "ft.mean": _reduction(np.mean, FLOATS),
    "ft.amax": _reduction(np.max),
    "ft.amin": _reduction(np.min),
    "ft.any": _reduction(lambda x, **k: np.any(x != 0, **k), ALL),
    "ft.all": _reduction(lambda x, **k: np.all(x != 0, **k), ALL),
    "ft.var": _reduction(np.var, FLOATS, correction=True),
    "ft.argmax": _arg_reduce(np.argmax),
    "ft.argmin": _arg_reduce(np.argmin),
    "ft.softmax": _softmax(log=False),
    "ft.log_softmax": _softmax(log=True),
    "ft.cumsum": _cumsum_case(),
    "ft.topk": _topk_case(),
    "ft.sort": _sort_case(),
    # shape and data movement
    "ft.transpose": _shape_op(_transpose_attrs, lambda x, a: np.transpose(x, a["perm"]), min_rank=0),
    "ft.slice": _shape_op(_slice_attrs, _slice_oracle),
    "ft.pad": _shape_op(_pad_attrs, _pad_oracle, dtypes=NUMERIC),
    "ft.flip": _shape_op(_flip_attrs, lambda x, a: np.flip(x, a["dims"]) if a["dims"] else x),
    "ft.reshape": _reshape_case(),
    "ft.broadcast_to": _broadcast_to_case(),
    "ft.concat": _concat_case(),
    "ft.gather": _gather_case(),
    "ft.scatter": _scatter_case(),
    "ft.index": _index_case(put=False),
    "ft.index_put": _index_case(put=True),
    "ft.dim": _dim_case(),
    # generators, constants, linear algebra
    "ft.full": _full_case(),
    "ft.iota": _iota_case(),
    "ft.constant": _constant_case(),
    "ft.matmul": _matmul_case(),
    "ft.gather_matmul": _gather_matmul_case(),
    "ft.conv": _conv_case(),
    "ft.attention": _attention_case(),
    "ft.attention_grad": _attention_grad_case(),
    # fallback calls and structure
    "ft.torch_call": _torch_call_case(),
    "ft.fusion": _region_case(outputs=1),
    "ft.yield": _region_case(outputs=2),
    "func.return": _return_case(),
}


# ---------------------------------------------------------------- running one op


def _module_for(name: str, spec: Spec) -> Module:
    """`@main(operands) { results = name(operands); return results }`; ft.fusion and
    ft.yield build their region, func.return returns the arguments."""
    module = Module.empty()
    _, block = new_function(module, "main", spec.operand_types)
    builder = Builder(block)
    if name == "func.return":
        builder.create("func.return", block.args, {}, [])
        return module
    regions = None
    if spec.body is not None:
        region_block = Block(spec.operand_types)
        region_builder = Builder(region_block)
        region_builder.create("ft.yield", spec.body(region_builder, region_block.args), {}, [])
        regions = [Region([region_block])]
        name = "ft.fusion"
    op = builder.create(name, block.args, spec.attributes, spec.result_types, regions)
    builder.create("func.return", op.results, {}, [])
    return module


def _assert_close(actual: Any, expected: Any, result_type: Type, what: str) -> None:
    """`actual` has exactly `result_type` (dynamic dims: any size) and `expected`'s values."""
    if not isinstance(result_type, TensorType):
        python_type = float if result_type.is_float else bool if result_type.name == "i1" else int
        assert type(actual) is python_type, f"{what}: {actual!r} is not a {result_type} scalar"
        assert actual == expected, f"{what}: {actual} != {expected}"
        return
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {actual!r}"
    assert actual.dtype == result_type.dtype.torch_dtype, f"{what}: dtype {actual.dtype} but type {result_type}"
    assert types_compatible(TensorType(tuple(actual.shape), result_type.dtype), result_type), (
        f"{what}: shape {list(actual.shape)} does not fit {result_type}")
    if expected is None:
        return  # values checked by the case's `check`
    expected = np.asarray(expected)
    assert tuple(actual.shape) == expected.shape, f"{what}: shape {list(actual.shape)}, oracle {list(expected.shape)}"
    if not actual.dtype.is_floating_point:
        assert np.array_equal(actual.numpy(), expected), f"{what}: {actual} != {expected}"
        return
    got = actual.double().numpy()
    # The closest the result type can come to the exact value (overflow to inf, underflow to 0 included).
    want = expected.astype(np.float64)
    if result_type.dtype.name in FLOATS:
        want = _round_to(want, result_type.dtype.name)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN where the oracle has none (or vice versa)"
    infinite = np.isinf(want)
    assert np.array_equal(got[infinite], want[infinite]), f"{what}: infinities differ"
    finite = ~np.isnan(want) & ~infinite
    error = np.linalg.norm(got[finite] - want[finite])
    scale = max(np.linalg.norm(want[finite]), 1e-30)
    assert error <= TOLERANCE[actual.dtype] * scale, f"{what}: relative L2 error {error / scale:.3g}"


def _result_types(module: Module) -> list[Type]:
    return [v.type for v in module.function().regions[0].block.terminator.operands]


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=15)
@given(data=st.data())
def test_reference_matches_independent_oracle(name, data):
    case = CASES[name]
    spec = case.spec(data.draw)
    module = _module_for(name, spec)
    verify(module)
    result_types = _result_types(module)
    outputs = run_module(module, spec.inputs)
    expected = case.oracle(spec.inputs, spec.attributes, result_types)
    assert len(outputs) == len(expected) == len(result_types)
    if case.check is not None:
        case.check(outputs, spec)
    for index, (actual, want, type_) in enumerate(zip(outputs, expected, result_types)):
        _assert_close(actual, want, type_, f"{name} result #{index}")


def _generalize(draw, t: Type) -> Type:
    if not isinstance(t, TensorType):
        return t
    return TensorType(tuple(None if draw(st.booleans()) else d for d in t.shape), t.dtype)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.dynamic))
@settings(max_examples=10)
@given(data=st.data())
def test_infer_with_dynamic_dims_generalizes_static(name, data):
    """Making operand dims dynamic never breaks inference, and every inferred static dim is the one
    the fully static operands give."""
    spec = CASES[name].spec(data.draw)
    static = _module_for(name, spec)
    static_types = [v.type for v in static.function().regions[0].block.terminator.operands]
    dynamic_operands = [_generalize(data.draw, t) for t in spec.operand_types]
    module = Module.empty()
    _, block = new_function(module, "main", dynamic_operands)
    inferred = infer_result_types(name, block.args, dict(spec.attributes), None)
    for got, want in zip(inferred, static_types):
        assert types_compatible(got, want), f"{name}: {got} does not generalize {want}"


def test_every_registered_op_has_a_case():
    registered = {opdef.name for opdef in all_ops()}
    missing = sorted(registered - CASES.keys())
    stale = sorted(CASES.keys() - registered)
    assert not missing, f"ops without a semantic test in tests/test_ops_reference.py CASES: {missing}"
    assert not stale, f"CASES names ops that are not registered: {stale}"


def test_every_case_op_has_a_reference_or_is_structural():
    structural = {"ft.fusion", "ft.yield", "func.return"}  # run by the executor itself
    for name in CASES:
        assert lookup(name).reference is not None or name in structural, name


def _same_dtype_tensors(spec: Spec) -> bool:
    types = spec.operand_types
    return (bool(types) and spec.result_types is None and spec.body is None
            and all(isinstance(t, TensorType) and t.dtype == types[0].dtype for t in types))


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=5)
@given(data=st.data())
def test_inference_accepts_only_element_types_the_reference_runs(name, data):
    """Retype an instance's operands to every element type the reference backend computes:
    whenever inference accepts the op, the reference runs and returns the inferred dtype,
    so the verifier never passes an op that fails at run time."""
    spec = CASES[name].spec(data.draw)
    if not CASES[name].retype or not _same_dtype_tensors(spec):
        return  # operand types fixed by construction (indices, sizes, declared results)
    for dtype in ALL:
        types = [t.with_dtype(ScalarType(dtype)) for t in spec.operand_types]
        inputs = [_tensor(data.draw, t.shape, dtype, "positive") for t in types]
        retyped = Spec(types, inputs, spec.attributes)
        try:
            module = _module_for(name, retyped)
        except VerificationError:
            continue
        outputs = run_module(module, inputs)
        for value, type_ in zip(outputs, _result_types(module)):
            runtime_type = value.dtype if isinstance(value, torch.Tensor) else type(value)
            declared = type_.dtype.torch_dtype if isinstance(type_, TensorType) else int
            assert runtime_type == declared, f"{name} on {dtype}: got {runtime_type} for {type_}"


def test_docs_ops_md_is_generated_from_the_definitions():
    path = Path(__file__).resolve().parent.parent / "docs" / "ops.md"
    assert path.read_text() == ops_markdown(), "docs/ops.md is stale: run `python -m flagtree.ir.docs > docs/ops.md`"


def test_docs_list_every_op_once():
    text = ops_markdown()
    for opdef in all_ops():
        assert text.count(f"| `{opdef.name}` |") == 1, opdef.name


def test_generated_tensors_follow_the_arguments_device():
    """ft.iota and constants build on the CPU; a graph on another device (meta here, cuda on a
    GPU) still runs, because the executor moves them to the arguments' device."""
    module = parse_module('''
"builtin.module"() ({
  "func.func"() <{function_type = (tensor<4xf32>) -> tensor<4xf32>, sym_name = "main"}> ({
  ^bb0(%x: tensor<4xf32>):
    %i = "ft.iota"() {start = 0 : i64, step = 1 : i64} : () -> tensor<4xf32>
    %c = "ft.constant"() {value = dense<[1.0, 2.0, 3.0, 4.0]> : tensor<4xf32>} : () -> tensor<4xf32>
    %s = "ft.add"(%x, %i) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    %r = "ft.mul"(%s, %c) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    "func.return"(%r) : (tensor<4xf32>) -> ()
  }) : () -> ()
}) : () -> ()''', "device.ftir")
    (result,) = run_module(module, [torch.zeros(4, device="meta")])
    assert result.device.type == "meta" and result.shape == (4,)
