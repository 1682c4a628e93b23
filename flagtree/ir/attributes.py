"""FTIR attribute values and their MLIR text form.

Attributes are plain Python values, printed as MLIR builtin attributes:

| Python                          | MLIR text                          |
|---------------------------------|------------------------------------|
| `int`                           | `3 : i64`                          |
| `float`                         | `5.0e-01 : f64` (inf/nan as hex)   |
| `bool`                          | `true` / `false`                   |
| `str`                           | `"text"`                           |
| `None`                          | `unit`                             |
| `tuple[int, ...]`               | `array<i64: 0, 2, 1>`              |
| `list`                          | `[a, b]`                           |
| `dict[str, ...]`                | `{a = 1 : i64}`                    |
| `ScalarType` / `TensorType`     | the type itself                    |
| `DenseAttr` (small tensors)     | `dense<[1.0, 2.0]> : tensor<2xf32>`|
| `ResourceAttr` (weights)        | `dense_resource<name> : tensor<..>`|
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from flagtree.ir.types import FunctionType, ScalarType, TensorType, Type, from_torch_dtype


@dataclass(frozen=True, eq=False)
class DenseAttr:
    """A literal tensor value held in the IR text (keep these small)."""

    value: torch.Tensor

    @property
    def type(self) -> TensorType:
        return TensorType(tuple(self.value.shape), from_torch_dtype(self.value.dtype))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DenseAttr)
            and self.type == other.type
            and bool(torch.equal(self.value, other.value) or _both_nan_equal(self.value, other.value))
        )

    def __hash__(self) -> int:
        return hash((self.type, self.value.numel()))


def _both_nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.dtype.is_floating_point:
        return False
    return bool(torch.equal(torch.nan_to_num(a.double(), nan=0.5), torch.nan_to_num(b.double(), nan=0.5))) and bool(
        torch.equal(a.isnan(), b.isnan())
    )


@dataclass(frozen=True)
class ResourceAttr:
    """A named tensor whose data lives beside the IR (frozen weights), not in the text."""

    name: str
    type: TensorType


Attribute = Any  # one of the Python kinds in the module docstring

def format_float(value: float, type_name: str = "f64") -> str:
    """A float literal MLIR accepts and that parses back to the same value.

    Finite values use Python's shortest round-trip repr (with the `.` MLIR needs);
    inf and nan use MLIR's hexadecimal bit-pattern form.
    """
    if math.isfinite(value):
        text = repr(float(value))
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return mantissa + ("e" + exponent if exponent else "")
    return "0x" + format(_float_bits(value, type_name), "X").rjust(_hex_width(type_name), "0")


def _hex_width(type_name: str) -> int:
    return ScalarType(type_name).bitwidth // 4


def _float_bits(value: float, type_name: str) -> int:
    dtype = ScalarType(type_name).torch_dtype
    t = torch.tensor([value], dtype=torch.float64).to(dtype)
    bits_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[ScalarType(type_name).bitwidth]
    raw = int(t.view(bits_dtype).item())
    return raw & ((1 << ScalarType(type_name).bitwidth) - 1)


def float_from_bits(bits: int, type_name: str) -> float:
    """Inverse of the hex form of `format_float`."""
    if type_name == "f64":
        return struct.unpack("<d", struct.pack("<Q", bits))[0]
    width = ScalarType(type_name).bitwidth
    bits_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[width]
    signed = bits - (1 << width) if bits_dtype != torch.uint8 and bits >= 1 << (width - 1) else bits
    return float(torch.tensor([signed], dtype=bits_dtype).view(ScalarType(type_name).torch_dtype).double().item())


def escape_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ord(ch) < 128:
            out.append(ch)
        else:
            out.extend(f"\\{b:02X}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def unescape_string(literal: str) -> str:
    """Decode an MLIR string literal (with its quotes)."""
    body = literal[1:-1]
    data = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            data.extend(ch.encode())
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in '"\\':
            data.extend(nxt.encode())
            i += 2
        elif nxt in "nt":
            data.extend(b"\n" if nxt == "n" else b"\t")
            i += 2
        else:
            data.append(int(body[i + 1 : i + 3], 16))
            i += 3
    return data.decode()


def format_attribute(value: Attribute) -> str:
    """The MLIR text of one attribute value."""
    if value is None:
        return "unit"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value} : i64"
    if isinstance(value, float):
        return f"{format_float(value)} : f64"
    if isinstance(value, str):
        return escape_string(value)
    if isinstance(value, tuple):
        return "array<i64" + (": " + ", ".join(str(v) for v in value) if value else "") + ">"
    if isinstance(value, list):
        return "[" + ", ".join(format_attribute(v) for v in value) + "]"
    if isinstance(value, dict):
        return format_attr_dict(value)
    if isinstance(value, (ScalarType, TensorType, FunctionType)):
        return str(value)
    if isinstance(value, DenseAttr):
        return f"dense<{_format_dense(value)}> : {value.type}"
    if isinstance(value, ResourceAttr):
        return f"dense_resource<{value.name}> : {value.type}"
    raise TypeError(f"{type(value).__name__} is not an FTIR attribute value: {value!r}")


def format_attr_dict(attrs: dict[str, Attribute]) -> str:
    return "{" + ", ".join(f"{k} = {format_attribute(attrs[k])}" for k in sorted(attrs)) + "}"


def _format_dense(attr: DenseAttr) -> str:
    t = attr.value
    dtype = attr.type.dtype
    flat = t.reshape(-1)
    if flat.numel() > 0 and bool((flat == flat[0]).all()) and not (dtype.is_float and bool(flat.isnan().any())):
        return _format_element(flat[0], dtype)
    return _format_nested(t, dtype)


def _format_nested(t: torch.Tensor, dtype: ScalarType) -> str:
    if t.dim() == 0:
        return _format_element(t, dtype)
    return "[" + ", ".join(_format_nested(row, dtype) for row in t) + "]"


def _format_element(t: torch.Tensor, dtype: ScalarType) -> str:
    if dtype.name == "i1":
        return "true" if bool(t) else "false"
    if dtype.is_integer:
        return str(int(t))
    value = float(t.double())
    if math.isfinite(value):
        return format_float(value)
    return "0x" + format(_float_bits(value, dtype.name), "X").rjust(_hex_width(dtype.name), "0")


def dense_from_literal(data: Any, type_: TensorType) -> DenseAttr:
    """Build a DenseAttr from parsed nested lists (or a splat scalar) and its type."""
    dtype = type_.dtype.torch_dtype
    shape = tuple(type_.shape)
    if not isinstance(data, list):
        value = torch.full(shape, data, dtype=torch.float64 if type_.dtype.is_float else torch.int64).to(dtype)
    else:
        value = torch.tensor(data, dtype=torch.float64 if type_.dtype.is_float else torch.int64).to(dtype)
        if tuple(value.shape) != shape:
            raise ValueError(f"dense literal has shape {list(value.shape)} but its type is {type_}")
    if type_.dtype.name == "i1":
        value = value.bool()
    return DenseAttr(value)


def attr_type_name(value: Attribute) -> str:
    """A short kind name used in verifier messages."""
    for kind, name in (
        (bool, "bool"),
        (int, "int"),
        (float, "float"),
        (str, "string"),
        (tuple, "int array"),
        (list, "array"),
        (dict, "dictionary"),
        (DenseAttr, "dense"),
        (ResourceAttr, "resource"),
    ):
        if isinstance(value, kind):
            return name
    if value is None:
        return "unit"
    if isinstance(value, Type.__args__):
        return "type"
    return type(value).__name__
