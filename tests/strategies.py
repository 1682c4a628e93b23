"""Hypothesis strategies for random, valid FTIR modules, shared by the test suite.

- `modules()`: everything the text form can express: static and dynamic shapes, every
  element type (fp8/fp4 as storage types only: arguments, casts, shape ops, constants),
  chains of elementwise, reduction, shape, softmax, top-k/sort and constant ops with
  edge-case attributes (negative and empty dims, inf/nan/-0.0/1e-300, strings with quotes
  and non-ASCII), multi-result ops, `ft.fusion` regions, dense and resource constants,
  symbolic sizes (`ft.dim` + i64 arithmetic), `ft.torch_call` with every attribute kind,
  and random locations.  For round-trip, verifier and MLIR-compatibility tests.
- `runnable_modules()`: static shapes, element types the reference backend computes
  (f32, bf16, f16, i64, i1), no resources, ops without domain errors.  For differential
  tests (a pass before vs after, compiled vs eager) with `random_inputs`.
- `result_tolerances(module, tolerance)`: how closely each result of a random program
  can match eager, by the narrowest float type it is computed through.
- `structure(module)`: a comparable, bit-exact summary of a module (floats by bit
  pattern, values by definition order), for "these two modules are the same" checks.

Every generated module passes `flagtree.ir.verify`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import strategies as st

from flagtree.ir import (
    Block,
    Builder,
    DenseAttr,
    FunctionType,
    Location,
    Module,
    OpResult,
    Region,
    ResourceAttr,
    ScalarType,
    TensorType,
    Value,
    new_function,
)
from flagtree.ir.types import I64, broadcast_shapes

FLOAT_DTYPES = ("f32", "bf16", "f16")
COMPUTE_DTYPES = (*FLOAT_DTYPES, "i64", "i1")
FP8_DTYPES = ("f8E4M3FN", "f8E5M2", "f8E8M0FNU")
STORAGE_DTYPES = (*FP8_DTYPES, "f4E2M1FN")  # types only: never computed on
ALL_DTYPES = (*COMPUTE_DTYPES, *STORAGE_DTYPES)

SPECIAL_FLOATS = (
    math.inf, -math.inf, math.nan, -math.nan, -0.0, 0.0, 1e-300, -1e-300, 5e-324, 2.2250738585072014e-308,
    1.7976931348623157e308, 0.1, 1.0, -2.5, 65504.0, 3.4028234663852886e38,
)
TRICKY_STRINGS = ("", '"', "\\", 'a "quoted" \\ string', "ümlaut", "日本語", "emoji 🙂", "tab\tnew\nline", "\x00\x7f")

# ---------------------------------------------------------------- primitive values


def floats_with_edges() -> st.SearchStrategy[float]:
    """Any float, with the edge cases (inf, nan, -0.0, subnormals, extremes) drawn often."""
    return st.sampled_from(SPECIAL_FLOATS) | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)


def texts() -> st.SearchStrategy[str]:
    """Any unicode string, with quotes, backslashes, control and non-ASCII characters drawn often."""
    return st.sampled_from(TRICKY_STRINGS) | st.text(max_size=12)


def i64s() -> st.SearchStrategy[int]:
    return st.integers(-(2**63), 2**63 - 1)


def bare_identifiers() -> st.SearchStrategy[str]:
    """Names MLIR accepts unquoted (resource handles): [A-Za-z_][A-Za-z0-9_$.]*."""
    return st.from_regex(r"[A-Za-z_][A-Za-z0-9_$.]{0,8}", fullmatch=True)


def locations() -> st.SearchStrategy[Location]:
    """Unknown, named, file:line:col, or named file locations with arbitrary text."""
    positions = st.integers(0, 10**6)
    return st.one_of(
        st.just(Location()),
        st.builds(Location, name=texts().filter(bool)),
        st.builds(Location, file=texts().filter(bool), line=positions, col=positions),
        st.builds(Location, file=texts().filter(bool), line=positions, col=positions, name=texts().filter(bool)),
    )


def shapes(rank: int | None = None, dynamic: bool = False, min_dim: int = 1, max_dim: int = 5):
    """Tensor shapes of rank 0-3 (or `rank`); `None` dims when `dynamic`."""
    dim = st.integers(min_dim, max_dim)
    if dynamic:
        dim = dim | st.none()
    ranks = st.just(rank) if rank is not None else st.integers(0, 3)
    return ranks.flatmap(lambda r: st.tuples(*[dim] * r))


def tensor_types(dtypes: tuple[str, ...] = ALL_DTYPES, dynamic: bool = True) -> st.SearchStrategy[TensorType]:
    return st.builds(lambda s, d: TensorType(s, ScalarType(d)), shapes(dynamic=dynamic), st.sampled_from(dtypes))


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


@st.composite
def dense_values(draw, type_: TensorType, finite: bool = False) -> torch.Tensor:
    """A tensor of `type_` (static): splats, edge-case floats, raw bit patterns (NaN
    payloads, signed NaNs), i1 and i64 values; `finite` keeps floats finite and non-zero."""
    shape = type_.shape
    numel = math.prod(shape)
    dtype = type_.dtype.torch_dtype
    if type_.dtype.name == "i1":
        elements = st.booleans()
    elif type_.dtype.is_integer:
        elements = st.integers(-9, 9).filter(bool) if finite else i64s()
    elif finite:
        elements = st.floats(0.25, 4.0) | st.floats(-4.0, -0.25)
    else:
        elements = floats_with_edges()
    count = 1 if draw(st.booleans()) or numel > 32 else numel  # large tensors: splats keep examples small
    values = draw(st.lists(elements, min_size=count, max_size=count))
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    wide = torch.tensor(values, dtype=torch.float64 if type_.dtype.is_float else torch.int64)
    tensor = torch.empty(shape, dtype=dtype).copy_(wide.to(dtype).expand(numel).reshape(shape))
    if type_.dtype.is_float and not finite and draw(st.booleans()):
        bits_dtype = _bits_dtype(dtype)
        width = 8 * dtype.itemsize
        pattern = draw(st.integers(0, 2**width - 1))
        signed = pattern - 2**width if bits_dtype != torch.uint8 and pattern >= 2 ** (width - 1) else pattern
        flat = tensor.reshape(-1).view(bits_dtype).clone()
        flat[draw(st.integers(0, numel - 1))] = signed
        tensor = flat.view(dtype).reshape(shape)
    return tensor


@st.composite
def dense_attrs(draw, dtypes: tuple[str, ...] = (*COMPUTE_DTYPES, "f64", *FP8_DTYPES)) -> DenseAttr:
    """Dense attributes of any storable element type, including empty tensors."""
    type_ = TensorType(draw(shapes(min_dim=0, max_dim=3)), ScalarType(draw(st.sampled_from(dtypes))))
    return DenseAttr(draw(dense_values(type_)))


def scalar_types() -> st.SearchStrategy[ScalarType]:
    return st.sampled_from((*ALL_DTYPES, "f64", "i8", "i32", "ui8")).map(ScalarType)


def attribute_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Every FTIR attribute kind, nested in lists and dictionaries."""
    types = scalar_types() | tensor_types()
    leaves = st.one_of(
        i64s(), floats_with_edges(), st.booleans(), texts(), st.none(),
        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(tuple),
        types,
        st.builds(lambda a, r: FunctionType(tuple(a), tuple(r)), st.lists(types, max_size=2),
                  st.lists(types, max_size=2)),
        dense_attrs(),
        st.builds(ResourceAttr, bare_identifiers(), tensor_types()),
    )
    keys = texts().filter(bool)
    return st.recursive(
        leaves, lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
        max_leaves=max_leaves,
    )


# ---------------------------------------------------------------- modules


@dataclass(frozen=True)
class _Config:
    dtypes: tuple[str, ...]  # argument element types
    dynamic: bool  # `?` dims in argument types
    runnable: bool  # only what the reference backend computes without domain errors
    max_ops: int
    max_functions: int
    fusion: bool = True


_UNARY_FLOAT_OPS = (
    "exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "atan",
    "sigmoid", "silu", "erf", "reciprocal", "floor", "ceil", "round", "trunc", "neg", "abs", "relu", "sign", "gelu",
)
# Defined on every finite input: no NaN from domain errors in differential tests.
_UNARY_FLOAT_SAFE = ("tanh", "sigmoid", "sin", "cos", "atan", "erf", "silu", "gelu", "neg", "abs", "relu", "floor",
                     "ceil", "round", "trunc", "sign", "exp")
_BINARY_FLOAT_OPS = ("add", "sub", "mul", "div", "maximum", "minimum", "pow", "atan2", "remainder", "fmod",
                     "floordiv")
_BINARY_FLOAT_SAFE = ("add", "sub", "mul", "maximum", "minimum")
_BINARY_INT_OPS = ("add", "sub", "mul", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor", "div",
                   "floordiv", "remainder")
_BINARY_INT_SAFE = ("add", "sub", "mul", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor")
_BINARY_BOOL_OPS = ("logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "add", "mul",
                    "maximum", "minimum")
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
_TORCH_CALL_TARGETS = ("aten::add.Tensor", "aten::mul.Tensor", "aten::relu.default", "aten::topk.default",
                       "aten::native_layer_norm.default")


class _FunctionGenerator:
    """Appends random, well-typed ops to one block, drawing every choice from hypothesis."""

    def __init__(self, draw: Any, config: _Config, module: Module, block: Block):
        self.draw = draw
        self.config = config
        self.module = module
        self.block = block
        self.builder = Builder(block)
        self.pool: list[Value] = list(block.args)

    # helpers ----------------------------------------------------------
    def pick(self, values: list[Value]) -> Value | None:
        return self.draw(st.sampled_from(values)) if values else None

    def tensors(self, dtypes: tuple[str, ...] | None = None, min_rank: int = 0, static: bool = False) -> list[Value]:
        return [
            v for v in self.pool
            if isinstance(v.type, TensorType) and (dtypes is None or v.type.dtype.name in dtypes)
            and v.type.rank >= min_rank and (v.type.is_static or not static)
        ]

    def location(self) -> Location:
        return self.draw(locations())

    def create(self, name: str, operands: list[Value], attributes: dict | None = None,
               result_types: list | None = None, regions: list[Region] | None = None) -> list[Value]:
        op = self.builder.create(name, operands, attributes, result_types, regions, location=self.location())
        self.pool.extend(op.results)
        return list(op.results)

    def dim_index(self, rank: int) -> int:
        """A dim of a rank-`rank` tensor, as often negative as not."""
        d = self.draw(st.integers(0, max(rank, 1) - 1))
        return d - max(rank, 1) if self.draw(st.booleans()) else d

    def sizes(self, v: Value, dims: list[int]) -> list[Value]:
        """i64 values holding v's sizes along `dims` (ft.dim: symbolic sizes)."""
        return [self.create("ft.dim", [v], {"dim": d})[0] for d in dims]

    def partner(self, v: Value) -> Value:
        """A value with v's element type whose shape broadcasts with v's (v itself, a pool value, or a new
        constant of a suffix of v's shape)."""
        candidates = [
            w for w in self.pool
            if type(w.type) is type(v.type) and _elem(w.type) == _elem(v.type) and _broadcasts(w.type, v.type)
        ]
        choice = self.draw(st.integers(0, 2))
        if choice == 0 or not isinstance(v.type, TensorType) or not v.type.is_static:
            return self.pick(candidates) or v
        if choice == 1:
            return v
        suffix = v.type.shape[self.draw(st.integers(0, v.type.rank)):]
        return self.constant(TensorType(suffix, v.type.dtype))

    def constant(self, type_: TensorType) -> Value:
        value = self.draw(dense_values(type_, finite=self.config.runnable))
        return self.create("ft.constant", [], {"value": DenseAttr(value)}, [type_])[0]

    # op generators: each returns False when the pool has nothing it applies to --------
    def unary(self) -> bool:
        v = self.pick(self.tensors(FLOAT_DTYPES))
        if v is None:
            return False
        names = _UNARY_FLOAT_SAFE if self.config.runnable else _UNARY_FLOAT_OPS
        name = self.draw(st.sampled_from(names))
        attrs = {"approximate": self.draw(st.sampled_from(("none", "tanh")))} if name == "gelu" else {}
        self.create(f"ft.{name}", [v], attrs)
        return True

    def clamp(self) -> bool:
        v = self.pick(self.tensors(FLOAT_DTYPES))
        if v is None:
            return False
        bound = st.floats(-3, 3) if self.config.runnable else floats_with_edges()
        attrs = {k: self.draw(bound) for k in ("min", "max") if self.draw(st.booleans())}
        self.create("ft.clamp", [v], attrs)
        return True

    def binary(self) -> bool:
        v = self.pick([w for w in self.pool if _elem(w.type).name in COMPUTE_DTYPES and w.type != ScalarType("i1")])
        if v is None:
            return False
        kind = _elem(v.type)
        if isinstance(v.type, ScalarType):  # symbolic sizes: i64 arithmetic on Python ints
            self.create(f"ft.{self.draw(st.sampled_from(('add', 'sub', 'mul', 'maximum')))}", [v, self.partner(v)])
            return True
        if kind.name == "i1":
            names = _BINARY_BOOL_OPS
        elif kind.is_float:
            names = _BINARY_FLOAT_SAFE if self.config.runnable else _BINARY_FLOAT_OPS
        else:
            names = _BINARY_INT_SAFE if self.config.runnable else _BINARY_INT_OPS
        name = self.draw(st.sampled_from(names + _COMPARISONS))
        self.create(f"ft.{name}", [v, self.partner(v)])
        return True

    def where(self) -> bool:
        v = self.pick(self.tensors(COMPUTE_DTYPES))
        if v is None:
            return False
        conds = [c for c in self.tensors(("i1",)) if _broadcasts(c.type, v.type)]
        cond = self.pick(conds) or self.create("ft.gt", [v, v])[0]
        self.create("ft.where", [cond, v, self.partner(v)])
        return True

    def cast(self) -> bool:
        v = self.pick(self.tensors())
        if v is None:
            return False
        targets = COMPUTE_DTYPES if self.config.runnable else ALL_DTYPES
        target = ScalarType(self.draw(st.sampled_from(targets)))
        self.create("ft.cast", [v], {}, [v.type.with_dtype(target)])
        return True

    def reduction(self) -> bool:
        v = self.pick(self.tensors(COMPUTE_DTYPES))
        if v is None:
            return False
        is_float = v.type.dtype.is_float
        names = ("sum", "prod", "amax", "amin", "any", "all") + (("mean", "var") if is_float else ())
        if v.type.dtype.name == "i1":
            names = ("any", "all", "sum")
        name = self.draw(st.sampled_from(names))
        chosen = self.draw(st.lists(st.integers(0, max(v.type.rank, 1) - 1), unique=True, max_size=v.type.rank))
        dims = tuple(d - v.type.rank if self.draw(st.booleans()) else d for d in chosen)
        attrs: dict[str, Any] = {"dims": dims, "keepdim": self.draw(st.booleans())}
        if name == "var":
            attrs["correction"] = 0 if self.config.runnable else self.draw(st.sampled_from((0, 1, 0.5)))
        self.create(f"ft.{name}", [v], attrs)
        return True

    def arg_reduce(self) -> bool:
        v = self.pick(self.tensors(("f32", "bf16", "f16", "i64"), min_rank=1))
        if v is None:
            return False
        name = self.draw(st.sampled_from(("argmax", "argmin")))
        self.create(f"ft.{name}", [v], {"dim": self.dim_index(v.type.rank), "keepdim": self.draw(st.booleans())})
        return True

    def softmax(self) -> bool:
        v = self.pick(self.tensors(FLOAT_DTYPES, min_rank=1))
        if v is None:
            return False
        name = self.draw(st.sampled_from(("softmax", "log_softmax")))
        result = v.type.with_dtype(ScalarType(self.draw(st.sampled_from(FLOAT_DTYPES))))
        self.create(f"ft.{name}", [v], {"dim": self.dim_index(v.type.rank)}, [result])
        return True

    def cumsum(self) -> bool:
        v = self.pick(self.tensors(("f32", "i64"), min_rank=1))
        if v is None:
            return False
        self.create("ft.cumsum", [v], {"dim": self.dim_index(v.type.rank)})
        return True

    def topk_or_sort(self) -> bool:
        v = self.pick(self.tensors(("f32", "bf16", "f16", "i64"), min_rank=1))
        if v is None:
            return False
        dim = self.dim_index(v.type.rank)
        size = v.type.shape[dim]
        if self.draw(st.booleans()):
            smallest = 1 if self.config.runnable else 0  # k = 0 gives empty tensors
            k = self.draw(st.integers(smallest, 3) if size is None else st.integers(smallest, size))
            stable_order = self.config.runnable or self.draw(st.booleans())
            attrs = {"k": k, "dim": dim, "largest": self.draw(st.booleans()), "sorted": stable_order}
            self.create("ft.topk", [v], attrs)
        else:
            attrs = {"dim": dim, "descending": self.draw(st.booleans()), "stable": True}
            self.create("ft.sort", [v], attrs)
        return True

    def transpose(self) -> bool:
        v = self.pick(self.tensors())
        if v is None:
            return False
        self.create("ft.transpose", [v], {"perm": tuple(self.draw(st.permutations(range(v.type.rank))))})
        return True

    def reshape(self) -> bool:
        v = self.pick(self.tensors())
        if v is None:
            return False
        if v.type.is_static:
            shape = self.draw(_factorizations(v.type.numel()))
            self.create("ft.reshape", [v], {}, [TensorType(shape, v.type.dtype)])
            return True
        # Flatten a dynamic shape: the size is the product of the dims, computed as i64 values.
        sizes = self.sizes(v, list(range(v.type.rank)))
        total = sizes[0]
        for size in sizes[1:]:
            total = self.create("ft.mul", [total, size])[0]
        self.create("ft.reshape", [v, total], {}, [TensorType((None,), v.type.dtype)])
        return True

    def broadcast_to(self) -> bool:
        v = self.pick(self.tensors())
        if v is None:
            return False
        lead = tuple(self.draw(st.lists(st.integers(1, 3), max_size=1)))
        shape = tuple(self.draw(st.integers(1, 3)) if d == 1 else d for d in v.type.shape)
        sizes = self.sizes(v, [i for i, d in enumerate(shape) if d is None])
        self.create("ft.broadcast_to", [v, *sizes], {}, [TensorType(lead + shape, v.type.dtype)])
        return True

    def slice(self) -> bool:
        v = self.pick(self.tensors(min_rank=1))
        if v is None:
            return False
        bound = st.integers(-6, 6)
        attrs = {"dim": self.dim_index(v.type.rank), "start": self.draw(bound), "end": self.draw(bound),
                 "step": self.draw(st.integers(1, 3))}
        if self.config.runnable:  # keep every dim non-empty
            attrs.update(start=0, end=self.draw(st.integers(1, 6)))
        self.create("ft.slice", [v], attrs)
        return True

    def concat(self) -> bool:
        v = self.pick(self.tensors(min_rank=1))
        if v is None:
            return False
        dim = self.dim_index(v.type.rank)
        others = [w for w in self.tensors() if _concatenable(w.type, v.type, dim)]
        operands = [v, *self.draw(st.lists(st.sampled_from(others), min_size=1, max_size=2))]
        self.create("ft.concat", operands, {"dim": dim})
        return True

    def flip(self) -> bool:
        v = self.pick(self.tensors(min_rank=1))
        if v is None:
            return False
        dims = self.draw(st.lists(st.integers(0, v.type.rank - 1), unique=True, max_size=v.type.rank))
        self.create("ft.flip", [v], {"dims": tuple(d - v.type.rank if d % 2 else d for d in dims)})
        return True

    def pad(self) -> bool:
        v = self.pick(self.tensors(COMPUTE_DTYPES, min_rank=1))
        if v is None:
            return False
        pairs = self.draw(st.integers(1, v.type.rank))
        pad = tuple(self.draw(st.lists(st.integers(0, 2), min_size=2 * pairs, max_size=2 * pairs)))
        value: Any = self.draw(st.integers(-3, 3))
        if v.type.dtype.name == "i1":
            value = 1 if value > 0 else 0
        elif v.type.dtype.is_float:
            value = self.draw(st.floats(-3, 3) if self.config.runnable else floats_with_edges())
        self.create("ft.pad", [v], {"pad": pad, "value": value})
        return True

    def matmul(self) -> bool:
        v = self.pick(self.tensors(FLOAT_DTYPES, min_rank=2))
        if v is None:
            return False
        swap_last_two = (*range(v.type.rank - 2), v.type.rank - 1, v.type.rank - 2)
        vt = self.create("ft.transpose", [v], {"perm": swap_last_two})[0]
        self.create("ft.matmul", [v, vt])
        return True

    def gather(self) -> bool:
        v = self.pick([w for w in self.tensors(min_rank=1, static=True) if 0 < w.type.numel() <= 32])
        if v is None:
            return False
        dim = self.dim_index(v.type.rank)
        index_type = TensorType(v.type.shape, I64)
        index = torch.tensor(self.draw(st.lists(st.integers(0, v.type.shape[dim] - 1), min_size=v.type.numel(),
                                                max_size=v.type.numel()))).reshape(v.type.shape)
        idx = self.create("ft.constant", [], {"value": DenseAttr(index)}, [index_type])[0]
        self.create("ft.gather", [v, idx], {"dim": dim})
        return True

    def symbolic_size(self) -> bool:
        v = self.pick(self.tensors(min_rank=1))
        if v is None:
            return False
        (size,) = self.sizes(v, [self.dim_index(v.type.rank)])
        name = self.draw(st.sampled_from(("add", "mul", "maximum", "sub")))
        self.create(f"ft.{name}", [size, self.draw(st.sampled_from([w for w in self.pool if w.type == I64]))])
        return True

    def dense_constant(self) -> bool:
        dtypes = COMPUTE_DTYPES if self.config.runnable else (*COMPUTE_DTYPES, *FP8_DTYPES)
        type_ = TensorType(self.draw(shapes()), ScalarType(self.draw(st.sampled_from(dtypes))))
        self.constant(type_)
        return True

    def scalar_constant(self) -> bool:
        kind = self.draw(st.sampled_from(("f32", "i64", "i1")))
        value: Any = {"f32": floats_with_edges(), "i64": i64s(), "i1": st.booleans()}[kind]
        if self.config.runnable:
            value = {"f32": st.floats(-4, 4), "i64": st.integers(-9, 9), "i1": st.booleans()}[kind]
        self.create("ft.constant", [], {"value": self.draw(value)}, [ScalarType(kind)])
        return True

    def resource_constant(self) -> bool:
        if self.config.runnable:
            return False
        type_ = self.draw(tensor_types(dynamic=False))
        name = f"{self.draw(bare_identifiers())}_{len(self.module.resources)}"
        self.module.resources[name] = torch.randn(type_.shape).to(type_.dtype.torch_dtype)
        self.create("ft.constant", [], {"value": ResourceAttr(name, type_)}, [type_])
        return True

    def full_or_iota(self) -> bool:
        like = self.pick(self.tensors(COMPUTE_DTYPES))
        if like is None:
            return False
        dtype = like.type.dtype
        if self.draw(st.booleans()) and like.type.rank == 1 and dtype.name in ("f32", "i64"):
            step = self.draw(st.integers(1, 3)) if dtype.is_integer else self.draw(st.floats(0.5, 2))
            attrs = {"start": self.draw(st.integers(-3, 3)), "step": step}
            self.create("ft.iota", self.sizes(like, [0]) if like.type.shape[0] is None else [], attrs, [like.type])
            return True
        value: Any = self.draw(st.booleans()) if dtype.name == "i1" else self.draw(st.integers(-5, 5).filter(bool))
        if dtype.is_float:
            value = self.draw(st.floats(-4, 4) if self.config.runnable else floats_with_edges())
        dynamic = [i for i, d in enumerate(like.type.shape) if d is None]
        self.create("ft.full", self.sizes(like, dynamic), {"value": value}, [like.type])
        return True

    def fusion(self) -> bool:
        if not self.config.fusion:
            return False
        candidates = self.tensors(COMPUTE_DTYPES)
        if not candidates:
            return False
        operands = self.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=2))
        block = Block([v.type for v in operands])
        inner = _FunctionGenerator(self.draw, replace(self.config, fusion=False, max_ops=3), self.module, block)
        inner.generate(_FUSABLE)
        produced = [v for v in inner.pool if not isinstance(v.type, ScalarType)] or inner.pool
        yielded = self.draw(st.lists(st.sampled_from(produced), min_size=1, max_size=2))
        inner.create("ft.yield", yielded, {}, [])
        kind = "elementwise" if self.config.runnable else self.draw(texts())
        self.create("ft.fusion", operands, {"kind": kind}, None, [Region([block])])
        return True

    def torch_call(self) -> bool:
        v = self.pick(self.tensors(FLOAT_DTYPES))
        if v is None:
            return False
        if self.config.runnable:
            self.create("ft.torch_call", [v, v], {"target": "aten::mul.Tensor",
                                                  "args": [{"operand": 0}, {"operand": 1}]}, [v.type])
            return True
        attrs = {"target": self.draw(st.sampled_from(_TORCH_CALL_TARGETS)),
                 "args": [{"operand": 0}, *self.draw(st.lists(attribute_values(), max_size=3))]}
        if self.draw(st.booleans()):
            attrs["kwargs"] = self.draw(st.dictionaries(texts().filter(bool), attribute_values(), max_size=3))
        results = self.draw(st.lists(tensor_types() | scalar_types(), max_size=2))
        self.create("ft.torch_call", [v], attrs, results)
        return True

    # driver -------------------------------------------------------------
    def generate(self, generators: tuple[str, ...]) -> None:
        count = self.draw(st.integers(1, self.config.max_ops))
        for _ in range(count):
            name = self.draw(st.sampled_from(generators))
            if not getattr(self, name)():
                self.dense_constant()

    def finish(self) -> None:
        """End the function with func.return of 1-3 values, the newest included (tensors
        only when runnable, so differential tests compare tensors)."""
        candidates = self.tensors() if self.config.runnable else self.pool
        returned = [candidates[-1], *self.draw(st.lists(st.sampled_from(candidates), max_size=2))]
        self.builder.create("func.return", returned, {}, [], location=self.location())


_FUSABLE = ("unary", "binary", "where", "cast", "clamp", "reduction", "softmax", "transpose", "broadcast_to")
_ALL_GENERATORS = (
    *_FUSABLE, "arg_reduce", "cumsum", "topk_or_sort", "reshape", "slice", "concat", "flip", "pad", "matmul",
    "gather", "symbolic_size", "dense_constant", "scalar_constant", "resource_constant", "full_or_iota", "fusion",
    "torch_call",
)


@st.composite
def _modules(draw, config: _Config) -> Module:
    module = Module.empty()
    n_functions = draw(st.integers(1, config.max_functions))
    others = draw(st.lists(texts().filter(lambda s: s != "main"), min_size=n_functions - 1,
                           max_size=n_functions - 1, unique=True))
    for name in ["main", *others]:
        arg_types = draw(st.lists(tensor_types(config.dtypes, config.dynamic), min_size=1, max_size=3))
        func, block = new_function(module, name, arg_types)
        func.location = draw(locations())
        generator = _FunctionGenerator(draw, config, module, block)
        generator.generate(_ALL_GENERATORS)
        generator.finish()
    return module


def modules(max_ops: int = 8, max_functions: int = 2) -> st.SearchStrategy[Module]:
    """Random valid modules using everything FTIR text can express (see the module docstring)."""
    return _modules(_Config(ALL_DTYPES, dynamic=True, runnable=False, max_ops=max_ops, max_functions=max_functions))


def runnable_modules(max_ops: int = 8) -> st.SearchStrategy[Module]:
    """Random valid modules with one function `@main` that the reference backend runs on
    `random_inputs`: static shapes, f32/bf16/f16/i64/i1, no resources, no ops with domain
    errors (results can still overflow to inf in long chains: compare with equal_nan)."""
    return _modules(_Config(COMPUTE_DTYPES, dynamic=False, runnable=True, max_ops=max_ops, max_functions=1))


def random_inputs(module: Module, seed: int | None = None, function: str = "main") -> list[torch.Tensor]:
    """Fresh arguments for `@function`: floats torch.randn (never zero), i64 in [-9, 9]
    without 0, i1 random.  `seed` makes the draw reproducible (pass a hypothesis-drawn int)."""
    generator = torch.Generator()
    generator.manual_seed(torch.seed() if seed is None else seed)
    inputs = []
    for arg in module.function(function).regions[0].block.args:
        if not isinstance(arg.type, TensorType) or not arg.type.is_static:
            raise ValueError(f"random_inputs needs static tensor arguments, not {arg.type}")
        shape, dtype = arg.type.shape, arg.type.dtype
        if dtype.name == "i1":
            value = torch.rand(shape, generator=generator) < 0.5
        elif dtype.is_integer:
            magnitude = torch.randint(1, 10, shape, generator=generator)
            sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1, 1)
            value = (magnitude * sign).to(dtype.torch_dtype)
        else:
            value = torch.randn(shape, generator=generator).to(dtype.torch_dtype)
        inputs.append(value)
    return inputs


def seeds() -> st.SearchStrategy[int]:
    """Seeds for `random_inputs`, drawn by hypothesis so a failure replays."""
    return st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- comparison


def result_tolerances(module: Module, tolerance: Mapping[torch.dtype, float]) -> list[float]:
    """For each result of @main, the `tolerance` of the narrowest float type it is computed
    through: a value rounded to f16 on its way holds f16 precision whatever type it ends in,
    and eager itself can be an f16 step off there (see test_triton_codegen's softmax test)."""
    results = module.function("main").regions[0].block.terminator.operands
    return [max((tolerance[t.torch_dtype] for t in _float_types_behind(v)), default=0.0) for v in results]


def _float_types_behind(value: Value) -> set[ScalarType]:
    """The float element types of `value` and every value it is computed from."""
    seen, pending, types = set(), [value], set()
    while pending:
        v = pending.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        dtype = v.type.dtype if isinstance(v.type, TensorType) else v.type
        if dtype.is_float:
            types.add(dtype)
        if isinstance(v, OpResult):
            pending += v.op.operands
            pending += [r for region in v.op.regions for op in region.block.ops for r in op.results]
    return types


def structure(module: Module, with_locations: bool = True) -> Any:
    """A nested tuple that two modules share exactly when they are the same IR: ops,
    operands (by definition order), types, attributes (floats and dense data bit-exact),
    regions and, if `with_locations`, locations."""
    numbering: dict[int, int] = {}

    def value_id(v: Value) -> Any:
        return numbering.get(id(v), ("undefined", repr(v)))

    def op_structure(op) -> Any:
        operands = tuple(value_id(v) for v in op.operands)
        for r in op.results:
            numbering[id(r)] = len(numbering)
        regions = tuple(tuple(block_structure(b) for b in region.blocks) for region in op.regions)
        attrs = tuple(sorted((k, attribute_key(v)) for k, v in op.attributes.items()))
        location = op.location if with_locations else None
        return op.name, operands, tuple(r.type for r in op.results), attrs, regions, location

    def block_structure(block: Block) -> Any:
        for a in block.args:
            numbering[id(a)] = len(numbering)
        return tuple(a.type for a in block.args), tuple(op_structure(op) for op in block.ops)

    return op_structure(module.op)


def attribute_key(value: Any) -> Any:
    """A hashable, bit-exact key for an attribute value (nan == nan, 0.0 != -0.0)."""
    if isinstance(value, bool) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, (int, str)):
        return (type(value).__name__, value)
    if isinstance(value, tuple):
        return ("array", value)
    if isinstance(value, list):
        return ("list", tuple(attribute_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, attribute_key(v)) for k, v in value.items())))
    if isinstance(value, DenseAttr):
        data = value.value
        flat = torch.empty(data.numel(), dtype=data.dtype).copy_(data.reshape(-1))
        raw = flat.to(torch.uint8) if data.dtype == torch.bool else flat.view(torch.uint8)
        return ("dense", value.type, bytes(raw.tolist()))
    return (type(value).__name__, value)


# ---------------------------------------------------------------- shape helpers


def _elem(t: Any) -> ScalarType:
    return t.dtype if isinstance(t, TensorType) else t


def _broadcasts(a: Any, b: Any) -> bool:
    """True if `a` broadcasts into `b`'s shape (the result keeps b's shape)."""
    shape_a = a.shape if isinstance(a, TensorType) else ()
    shape_b = b.shape if isinstance(b, TensorType) else ()
    try:
        return broadcast_shapes(shape_a, shape_b) == shape_b
    except ValueError:
        return False


def _concatenable(a: TensorType, b: TensorType, dim: int) -> bool:
    if a.rank != b.rank or a.dtype != b.dtype:
        return False
    d = dim % b.rank
    return all(i == d or x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)))


@st.composite
def _factorizations(draw, numel: int) -> tuple[int, ...]:
    """A shape of rank 1-3 with `numel` elements."""
    if numel == 0:
        return draw(st.sampled_from(((0,), (0, 2), (3, 0))))
    factors = []
    remaining = numel
    for _ in range(draw(st.integers(0, 2))):
        divisors = [d for d in range(1, remaining + 1) if remaining % d == 0]
        factor = draw(st.sampled_from(divisors))
        factors.append(factor)
        remaining //= factor
    if remaining != 1 or not factors or draw(st.booleans()):
        factors.append(remaining)
    return tuple(factors)


# ---------------------------------------------------------------- bf16 rounding, shared by the code generators' tests

BF16_ROUNDING_TYPES = ["tensor<128x1xbf16>", "tensor<128xbf16>"]


def bf16_rounding_body(b: Builder, args: list[Value]) -> list[Value]:
    """x·y + x cast to f32, floor(x·y) and x·y == round(x·y), all in bf16: a kernel that skips
    one bf16 rounding disagrees with eager on some element of `bf16_rounding_inputs`."""
    x, y = args
    product = b.value("ft.mul", x, y)
    total = b.value("ft.add", product, x)
    as_f32 = b.value("ft.cast", total, result_type=TensorType(total.type.shape, ScalarType("f32")))
    return [as_f32, b.value("ft.floor", product), b.value("ft.eq", product, b.value("ft.round", product))]


def bf16_rounding_inputs() -> list[torch.Tensor]:
    """Every bf16 in [1, 2) (as a column) and twice it (as a row): products just below an integer
    round up to it in bf16, so their floor depends on the rounding."""
    every_bf16_in_1_to_2 = 1 + torch.arange(128, dtype=torch.float32) / 128
    x, y = every_bf16_in_1_to_2.reshape(128, 1), 2 * every_bf16_in_1_to_2
    exact = x * y  # two 8-bit significands: exact in f32
    assert (exact.floor() != exact.bfloat16().float().floor()).any(), "the inputs must reach the case"
    return [x.bfloat16(), y.bfloat16()]
