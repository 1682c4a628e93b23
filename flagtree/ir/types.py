"""FTIR types: element (scalar) types and ranked tensor types.

Text forms follow MLIR's builtin types, so FTIR text is also valid MLIR:
`f32`, `bf16`, `f8E4M3FN`, `i64`, `i1`, `tensor<2x?x64xbf16>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# MLIR spelling → torch dtype.  fp4 has no unpacked torch dtype; its tensors are
# computed in bf16 by the reference backend (see `torch_dtype`).
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8E4M3FN": torch.float8_e4m3fn,
    "f8E5M2": torch.float8_e5m2,
    "f8E8M0FNU": torch.float8_e8m0fnu,
    "i1": torch.bool,
    "i8": torch.int8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "ui8": torch.uint8,
}
_FP4 = "f4E2M1FN"
ELEMENT_TYPE_NAMES: tuple[str, ...] = (*_TORCH_DTYPES, _FP4)
_FLOAT_NAMES = frozenset({"f64", "f32", "f16", "bf16", "f8E4M3FN", "f8E5M2", "f8E8M0FNU", _FP4})


@dataclass(frozen=True)
class ScalarType:
    """An element type; also the type of scalar SSA values such as symbolic sizes (i64)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ELEMENT_TYPE_NAMES:
            raise ValueError(f"unknown element type '{self.name}'; valid: {', '.join(ELEMENT_TYPE_NAMES)}")

    def __str__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        return self.name in _FLOAT_NAMES

    @property
    def is_integer(self) -> bool:
        return not self.is_float

    @property
    def bitwidth(self) -> int:
        if self.name == "i1":
            return 1
        return int(re.search(r"\d+", self.name).group())

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype that holds values of this type (bf16 for unpacked fp4)."""
        return _TORCH_DTYPES.get(self.name, torch.bfloat16)


@dataclass(frozen=True)
class TensorType:
    """A ranked tensor; `None` in `shape` is a dynamic dimension (`?`)."""

    shape: tuple[int | None, ...]
    dtype: ScalarType

    def __str__(self) -> str:
        dims = "".join(("?" if d is None else str(d)) + "x" for d in self.shape)
        return f"tensor<{dims}{self.dtype}>"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(d is not None for d in self.shape)

    def numel(self) -> int | None:
        """Element count, or None when a dimension is dynamic."""
        if not self.is_static:
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n

    def with_dtype(self, dtype: ScalarType) -> TensorType:
        return TensorType(self.shape, dtype)


Type = ScalarType | TensorType

# The scalar types passes, the importer and backends name most: booleans, sizes, f32, f64.
I1 = ScalarType("i1")
I64 = ScalarType("i64")
F32 = ScalarType("f32")
F64 = ScalarType("f64")


def scalar(name: str) -> ScalarType:
    return ScalarType(name)


def tensor(shape: tuple[int | None, ...] | list[int | None], dtype: str | ScalarType) -> TensorType:
    """Shorthand: `tensor((2, None), "f32")` is `tensor<2x?xf32>`."""
    if isinstance(dtype, str):
        dtype = ScalarType(dtype)
    return TensorType(tuple(shape), dtype)


_FROM_TORCH = {v: ScalarType(k) for k, v in _TORCH_DTYPES.items()}


def from_torch_dtype(dtype: torch.dtype) -> ScalarType:
    """The FTIR element type of a torch dtype; raises ValueError for dtypes FTIR lacks."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no FTIR element type") from None


_TENSOR_RE = re.compile(r"tensor<((?:(?:\d+|\?)x)*)([A-Za-z][A-Za-z0-9]*)>")


def parse_type(text: str) -> Type:
    """Parse a type written in MLIR syntax; raises ValueError with the reason."""
    text = text.strip()
    if text in ELEMENT_TYPE_NAMES:
        return ScalarType(text)
    m = _TENSOR_RE.fullmatch(text)
    if not m:
        raise ValueError(f"'{text}' is not an FTIR type (expected e.g. f32 or tensor<2x?xbf16>)")
    dims = tuple(None if d == "?" else int(d) for d in m.group(1).split("x")[:-1])
    return TensorType(dims, ScalarType(m.group(2)))


def broadcast_shapes(*shapes: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """NumPy broadcasting with dynamic dims; raises ValueError if the shapes conflict."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[int | None] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        static = {d for d in dims if d is not None and d != 1}
        if len(static) > 1:
            raise ValueError(f"shapes {' and '.join(map(_shape_str, shapes))} do not broadcast")
        if static:
            out.append(static.pop())
        elif any(d is None for d in dims):
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def _shape_str(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def shapes_compatible(a: tuple[int | None, ...], b: tuple[int | None, ...]) -> bool:
    """Equal rank and every pair of dims equal or at least one dynamic."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def types_compatible(a: Type, b: Type) -> bool:
    if isinstance(a, TensorType) and isinstance(b, TensorType):
        return a.dtype == b.dtype and shapes_compatible(a.shape, b.shape)
    return a == b


@dataclass(frozen=True)
class FunctionType:
    """`(inputs) -> results`, used by `func.func`'s `function_type` and op signatures."""

    inputs: tuple[Type, ...]
    results: tuple[Type, ...]

    def __str__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        if len(self.results) == 1 and not isinstance(self.results[0], FunctionType):
            outs = str(self.results[0])
        else:
            outs = "(" + ", ".join(map(str, self.results)) + ")"
        return f"({ins}) -> {outs}"
