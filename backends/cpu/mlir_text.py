"""Writing MLIR text: SSA names, hoisted constants, element and tensor type spellings.

The cpu backend emits MLIR as text (readable for `--emit=mlir`, and parsed by MLIR's own
parser before lowering), so this module owns the few conventions every emitter shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from flagtree.errors import FlagtreeError
from flagtree.ir.attributes import format_float
from flagtree.ir.types import ScalarType

# Element types a kernel can read and write; f16/bf16 are computed in f32 (see compute_type).
STORAGE_TYPES = frozenset({"f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "i1"})
_NARROW_FLOATS = frozenset({"f16", "bf16"})


class UnsupportedError(FlagtreeError):
    """The cpu backend cannot generate code for this op or type; the message says which."""


def storage_type(dtype: ScalarType) -> str:
    """The MLIR element type of tensors of `dtype` in memory."""
    if dtype.name not in STORAGE_TYPES:
        raise UnsupportedError(f"element type {dtype} is not supported by the cpu code generator "
                               f"(supported: {', '.join(sorted(STORAGE_TYPES))})")
    return dtype.name


def compute_type(dtype: ScalarType) -> str:
    """The MLIR type arithmetic on `dtype` runs in: f32 for f16/bf16 (x86 has no bf16 ALU ops;
    eager torch computes them in f32 too, and rounds each op's result to its type)."""
    storage = storage_type(dtype)
    return "f32" if storage in _NARROW_FLOATS else storage


def is_narrow_float(dtype: ScalarType) -> bool:
    """Whether `dtype` is computed in a wider type (f32) than it holds: f16, bf16."""
    return dtype.name in _NARROW_FLOATS


def tensor_type(shape: tuple[int | None, ...], element: str) -> str:
    dims = "".join(("?" if d is None else str(d)) + "x" for d in shape)
    return f"tensor<{dims}{element}>"


def memref_type(shape: tuple[int | None, ...], element: str) -> str:
    dims = "".join(("?" if d is None else str(d)) + "x" for d in shape)
    return f"memref<{dims}{element}>"


def literal(value: float | int | bool, mlir_type: str) -> str:
    """The text of a scalar constant of `mlir_type` (`arith.constant` operand form)."""
    if mlir_type == "i1":
        return "true" if value else "false"
    if mlir_type.startswith("i") or mlir_type == "index":
        return str(int(value))
    value = float(value)
    if math.isfinite(value):
        return format_float(value)
    return format_float(value, mlir_type)


class FunctionWriter:
    """Accumulates one `func.func` body: fresh SSA names, hoisted constants, nested lines."""

    def __init__(self) -> None:
        self.prologue: list[str] = []
        self.lines: list[str] = []
        self.depth = 2  # inside `module {` and `func.func {`
        self._counter = 0
        self._constants: dict[tuple[str, str], str] = {}
        self.helpers: set[str] = set()  # names of approximation functions the body calls

    def fresh(self, prefix: str = "v") -> str:
        self._counter += 1
        return f"%{prefix}{self._counter}"

    def line(self, text: str) -> None:
        self.lines.append("  " * self.depth + text)

    def emit(self, rhs: str, prefix: str = "v") -> str:
        """Append `%new = rhs` and return `%new`."""
        name = self.fresh(prefix)
        self.line(f"{name} = {rhs}")
        return name

    def constant(self, value: float | int | bool, mlir_type: str) -> str:
        """An SSA constant, defined once at the top of the function (visible in every region)."""
        text = literal(value, mlir_type)
        key = (text, mlir_type)
        if key not in self._constants:
            name = self.fresh("c")
            self._constants[key] = name
            typed = text if mlir_type == "i1" else f"{text} : {mlir_type}"  # true/false are already i1
            self.prologue.append(f"    {name} = arith.constant {typed}")
        return self._constants[key]

    def index(self, value: int) -> str:
        return self.constant(value, "index")

    @contextmanager
    def loop(self, lower: int | str, upper: int | str, step: int = 1) -> Iterator[str]:
        """An scf.for over [lower, upper) (ints are constants); yields the induction variable."""
        iv = self.fresh("i")
        bounds = [self.index(b) if isinstance(b, int) else b for b in (lower, upper)]
        self.line(f"scf.for {iv} = {bounds[0]} to {bounds[1]} step {self.index(step)} {{")
        self.depth += 1
        yield iv
        self.depth -= 1
        self.line("}")

    def body(self) -> list[str]:
        return self.prologue + self.lines
