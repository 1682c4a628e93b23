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

A dict key or resource name that is not an MLIR bare identifier (`[A-Za-z_][A-Za-z0-9_$.]*`)
prints as a string literal: `{"a-b" = 1 : i64}`, `dense_resource<"0.weight">`.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch

from flagtree.ir.types import FunctionType, ScalarType, TensorType, from_torch_dtype


@dataclass(frozen=True, eq=False)
class DenseAttr:
    """A literal tensor value held in the IR text (keep these small)."""

    value: torch.Tensor

    @property
    def type(self) -> TensorType:
        return TensorType(tuple(self.value.shape), from_torch_dtype(self.value.dtype))

    def __eq__(self, other: object) -> bool:
        # Bitwise, like MLIR's attribute uniquing: 0.0 and -0.0 differ, equal NaNs match.
        return (
            isinstance(other, DenseAttr)
            and self.type == other.type
            and bool(torch.equal(_bit_view(self.value), _bit_view(other.value)))
        )

    def __hash__(self) -> int:
        return hash((self.type, self.value.numel()))


_BITS_DTYPES = {1: torch.bool, 8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements, flattened, as same-width integers, so comparisons see bit patterns."""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # unit stride, even for expanded tensors
    return flat.view(_BITS_DTYPES[t.element_size() * 8]) if t.dtype.is_floating_point else flat


@dataclass(frozen=True)
class FloatBits:
    """A float element of a dense literal written as its bit pattern (hex): kept exactly,
    since converting NaN payloads and signs through Python floats is lossy."""

    bits: int


@dataclass(frozen=True)
class ResourceAttr:
    """A named tensor whose data lives beside the IR (frozen weights), not in the text.
    Any non-empty string is a valid name."""

    name: str
    type: TensorType

    def __post_init__(self) -> None:
        # MLIR's parser declares an empty handle anew at each use and renames all but the
        # first (to `_1`, ...), so two uses of one empty name would name different tensors.
        if not self.name:
            raise ValueError("a dense_resource needs a non-empty name")


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
    """Decode an MLIR string literal (with its quotes); raises ValueError for a bad escape."""
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
            digits = body[i + 1 : i + 3]
            if not re.fullmatch(r"[0-9A-Fa-f]{2}", digits):
                raise ValueError(f"'\\{digits}' is not an escape (use \\\\, \\\", \\n, \\t or two hex digits)")
            data.append(int(digits, 16))
            i += 3
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ValueError("its hex escapes do not form valid UTF-8") from None


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
        return f"dense_resource<{_format_name(value.name)}> : {value.type}"
    raise TypeError(f"{type(value).__name__} is not an FTIR attribute value: {value!r}")


def format_attr_dict(attrs: dict[str, Attribute]) -> str:
    return "{" + ", ".join(f"{_format_name(k)} = {format_attribute(attrs[k])}" for k in sorted(attrs)) + "}"


_BARE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_$.]*")


def _format_name(name: str) -> str:
    """An attribute name or resource handle: bare when MLIR's lexer reads it as one
    identifier, else a string literal (MLIR reads both forms as the same name)."""
    return name if _BARE_ID.fullmatch(name) else escape_string(name)


def _format_dense(attr: DenseAttr) -> str:
    t = attr.value
    dtype = attr.type.dtype
    if t.numel() == 0:
        return ""  # MLIR's form for every empty shape (`dense<[]>` only fits rank 1)
    bits = _bit_view(t)
    if bool((bits == bits[0]).all()):
        return _format_element(t.reshape(-1)[0], dtype)
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
    bits = int(_bit_view(t).item()) & ((1 << dtype.bitwidth) - 1)
    return "0x" + format(bits, "X").rjust(_hex_width(dtype.name), "0")


def dense_from_literal(data: Any, type_: TensorType) -> DenseAttr:
    """Build a DenseAttr from parsed nested lists, a splat scalar, or None (`dense<>`),
    and its type.  Float elements may be `FloatBits` (hex bit patterns)."""
    shape = tuple(type_.shape)
    if type_.dtype.name == "f4E2M1FN":
        raise ValueError("dense f4E2M1FN data has no unpacked torch dtype; hold fp4 weights in a dense_resource")
    if data is None:
        if type_.numel() != 0:
            raise ValueError(f"dense<> is only valid for an empty tensor, not {type_}")
        return DenseAttr(torch.zeros(shape, dtype=type_.dtype.torch_dtype))
    value = _tensor_from_nested(data, type_.dtype)
    if not isinstance(data, list):
        value = torch.empty(shape, dtype=value.dtype).copy_(value)
    elif tuple(value.shape) != shape:
        raise ValueError(f"dense literal has shape {list(value.shape)} but its type is {type_}")
    return DenseAttr(value)


def _tensor_from_nested(data: Any, dtype: ScalarType) -> torch.Tensor:
    numbers = _map_nested(data, lambda e: 0 if isinstance(e, FloatBits) else e)
    try:
        wide = torch.tensor(numbers, dtype=torch.float64 if dtype.is_float else torch.int64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"dense literal cannot be read as {dtype} values: {e}") from None
    value = wide.to(dtype.torch_dtype)
    if dtype.is_integer and dtype.name != "i1" and not torch.equal(value.to(torch.int64), wide):
        raise ValueError(f"dense literal has values out of range for {dtype}")
    if not dtype.is_float or not _any_nested(data, lambda e: isinstance(e, FloatBits)):
        return value
    bits_dtype = _BITS_DTYPES[dtype.bitwidth]

    def signed_bits(e: Any) -> int:
        if not isinstance(e, FloatBits):
            return 0
        if e.bits >= 1 << dtype.bitwidth:
            raise ValueError(f"hex literal {e.bits:#x} has more bits than {dtype}")
        # torch stores wide patterns in signed ints; uint8 takes 0..255 as is.
        wraps = bits_dtype != torch.uint8 and e.bits >= 1 << (dtype.bitwidth - 1)
        return e.bits - (1 << dtype.bitwidth) if wraps else e.bits

    bits = torch.tensor(_map_nested(data, signed_bits), dtype=torch.int64).to(bits_dtype)
    is_bits = torch.tensor(_map_nested(data, lambda e: isinstance(e, FloatBits)), dtype=torch.bool)
    return torch.where(is_bits, bits, value.view(bits_dtype)).view(dtype.torch_dtype)


def _map_nested(data: Any, fn: Any) -> Any:
    return [_map_nested(d, fn) for d in data] if isinstance(data, list) else fn(data)


def _any_nested(data: Any, predicate: Any) -> bool:
    return any(_any_nested(d, predicate) for d in data) if isinstance(data, list) else predicate(data)
