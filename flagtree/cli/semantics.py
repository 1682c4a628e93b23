"""Differential semantic checking of passes: run the IR before and after each pass on the
same random inputs through the reference backend and compare the results.

`flagtree-opt --check-semantics` plugs a `SemanticChecker` into the pass manager's
`after_pass` hook; tests use `check_pass` / `compare_results` directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flagtree.backends.reference import run_module
from flagtree.errors import FlagtreeError
from flagtree.ir.core import Module, Operation
from flagtree.ir.types import ScalarType, TensorType

# Relative L2 tolerances (DESIGN.md); a float dtype not listed here gets two ulps at 1.0.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# The size of every dynamic dim and scalar size argument when `ft.symbols` does not name them all.
DEFAULT_DYNAMIC_SIZE = 3
# Symbols get a size in [2, 8]: small enough to run fast, and not 1, which would hide broadcasting bugs.
SYMBOL_SIZES = (2, 8)
# Integer tensor arguments are drawn from [-8, 8].
INT_RANGE = (-8, 8)
SYMBOLS_ATTRIBUTE = "ft.symbols"


class SemanticsError(FlagtreeError):
    """A pass changed what the IR computes (or the check itself could not run)."""


def tolerance(dtype: torch.dtype) -> float:
    """The relative L2 error allowed between two results of the float dtype `dtype`."""
    return TOLERANCES.get(dtype, 2 * torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- inputs


Slot = tuple[int, ...]  # (argument, dim) for a dynamic tensor dim; (argument,) for a scalar size argument


def dynamic_slots(func: Operation) -> list[Slot]:
    """Every place an argument of `func` needs a size: each `?` dim and each integer scalar."""
    slots: list[Slot] = []
    for index, arg in enumerate(func.regions[0].block.args):
        if isinstance(arg.type, TensorType):
            slots.extend((index, dim) for dim, size in enumerate(arg.type.shape) if size is None)
        elif arg.type.is_integer and arg.type.name != "i1":
            slots.append((index,))
    return slots


def symbol_sources(func: Operation) -> dict[Slot, str]:
    """The slot each symbol of `ft.symbols` comes from (`{s0 = array<i64: arg, dim>}`, or
    `array<i64: arg>` for a scalar size argument); empty without the attribute."""
    symbols = func.attributes.get(SYMBOLS_ATTRIBUTE)
    if symbols is None:
        return {}
    slots = set(dynamic_slots(func))
    if not isinstance(symbols, dict) or not all(isinstance(s, tuple) and s in slots for s in symbols.values()):
        raise SemanticsError(f"@{func.attributes.get('sym_name')}: '{SYMBOLS_ATTRIBUTE}' must map each symbol to "
                             f"the dynamic dim (array<i64: arg, dim>) or size argument (array<i64: arg>) it comes "
                             f"from; got {symbols!r}")
    return {slot: name for name, slot in symbols.items()}


def slot_sizes(func: Operation, generator: torch.Generator) -> dict[Slot, int]:
    """A size for every dynamic slot of `func`.

    When `ft.symbols` names the symbol of every slot, each symbol gets its own random size
    in SYMBOL_SIZES, the same wherever it appears. Otherwise some slot's symbol is unknown
    (the frontend records only where each symbol first appears), and only one size for
    every slot is sure to be consistent: DEFAULT_DYNAMIC_SIZE.
    """
    slots = dynamic_slots(func)
    sources = symbol_sources(func)
    if not all(slot in sources for slot in slots):
        return dict.fromkeys(slots, DEFAULT_DYNAMIC_SIZE)
    low, high = SYMBOL_SIZES
    sizes = {name: int(torch.randint(low, high + 1, (), generator=generator)) for name in sorted(set(sources.values()))}
    return {slot: sizes[sources[slot]] for slot in slots}


def random_arguments(func: Operation, generator: torch.Generator) -> list[Any]:
    """Fresh random arguments for `func`: randn floats, small ints, random bools, and the
    sizes `slot_sizes` picks for dynamic dims and scalar size arguments."""
    sizes = slot_sizes(func, generator)
    arguments = []
    for index, arg in enumerate(func.regions[0].block.args):
        if isinstance(arg.type, TensorType):
            shape = [sizes[(index, dim)] if d is None else d for dim, d in enumerate(arg.type.shape)]
            arguments.append(_random_tensor(shape, arg.type.dtype, generator))
        elif arg.type.is_float:
            arguments.append(float(torch.randn((), generator=generator)))
        elif arg.type.name == "i1":
            arguments.append(bool(torch.randint(0, 2, (), generator=generator)))
        else:
            # Scalar integer arguments are symbolic sizes (see DESIGN.md), so they get a size, not noise.
            arguments.append(sizes[(index,)])
    return arguments


def _random_tensor(shape: list[int], dtype: ScalarType, generator: torch.Generator) -> torch.Tensor:
    if dtype.name == "i1":
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_float:
        return torch.randn(shape, generator=generator).to(dtype.torch_dtype)
    low = 0 if dtype.name.startswith("ui") else INT_RANGE[0]
    return torch.randint(low, INT_RANGE[1] + 1, shape, generator=generator).to(dtype.torch_dtype)


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Mismatch:
    """How the results differ: which one (None: their number) and by how much (`error`,
    the relative L2 error; inf for changes of type, shape, NaNs or exact values)."""

    output: int | None
    detail: str
    error: float = math.inf

    def __str__(self) -> str:
        return self.detail if self.output is None else f"result #{self.output}: {self.detail}"


def compare_results(expected: Sequence[Any], actual: Sequence[Any]) -> Mismatch | None:
    """The first result of `actual` that differs from `expected` beyond tolerance, or None."""
    if len(expected) != len(actual):
        return Mismatch(None, f"{len(actual)} results instead of {len(expected)}")
    for index, (want, got) in enumerate(zip(expected, actual)):
        mismatch = _compare_value(index, want, got)
        if mismatch is not None:
            return mismatch
    return None


def _compare_value(index: int, want: Any, got: Any) -> Mismatch | None:
    if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
        return Mismatch(index, f"{type(got).__name__} instead of {type(want).__name__}")
    if not isinstance(want, torch.Tensor):
        want, got = torch.tensor(want), torch.tensor(got)
    if want.dtype != got.dtype:
        return Mismatch(index, f"dtype {got.dtype} instead of {want.dtype}")
    if want.shape != got.shape:
        return Mismatch(index, f"shape {list(got.shape)} instead of {list(want.shape)}")
    if want.dtype.is_floating_point:
        return _compare_floats(index, want.double(), got.double(), tolerance(want.dtype))
    wrong = int((want != got).sum())
    if wrong:
        return Mismatch(index, f"{wrong} of {want.numel()} elements differ (exact dtype {want.dtype})")
    return None


def _compare_floats(index: int, want: torch.Tensor, got: torch.Tensor, tol: float) -> Mismatch | None:
    nan_moved = int((want.isnan() != got.isnan()).sum())
    if nan_moved:
        return Mismatch(index, f"NaN at {nan_moved} positions where the other side is a number")
    finite = want.isfinite()
    infinite = ~finite & ~want.isnan()
    inf_changed = int((want[infinite] != got[infinite]).sum() + (~got[finite].isfinite()).sum())
    if inf_changed:
        return Mismatch(index, f"{inf_changed} infinite values differ")
    diff = torch.linalg.vector_norm(got[finite] - want[finite]).item()
    scale = torch.linalg.vector_norm(want[finite]).item()
    error = diff / scale if scale > 0 else diff
    if error > tol:
        return Mismatch(index, f"relative L2 error {error:.3g} exceeds the {tol:g} tolerance of "
                               f"{str(want.dtype).removeprefix('torch.')} results", error)
    return None


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class FunctionInputs:
    """The arguments one function of the module is checked on."""

    name: str
    arguments: list[Any]


def draw_inputs(module: Module, seed: int) -> list[FunctionInputs]:
    """Random arguments for every function of `module`, reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [FunctionInputs(f.attributes["sym_name"], random_arguments(f, generator)) for f in module.functions]


def _run(module: Module, inputs: FunctionInputs) -> list[Any]:
    return run_module(module, inputs.arguments, inputs.name)


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, FlagtreeError) else f"{type(error).__name__}: {error}"


def check_pass(pass_name: str, before: Module, after: Module, inputs: Sequence[FunctionInputs], seed: int) -> None:
    """Raise SemanticsError if `after` computes something different from `before` on `inputs`."""
    for function in inputs:
        try:
            expected = _run(before, function)
        except Exception as e:  # whatever the failure, the IR before the pass is what cannot run
            raise SemanticsError(f"--check-semantics: before pass '{pass_name}', @{function.name} fails on random "
                                 f"inputs (seed {seed}), so it cannot be checked: {_describe(e)}") from e
        try:
            actual = _run(after, function)
        except Exception as e:  # whatever the failure, the pass caused it
            raise SemanticsError(f"pass '{pass_name}' breaks @{function.name}: it ran before the pass but fails "
                                 f"after it on the same inputs (seed {seed}): {_describe(e)}") from e
        mismatch = compare_results(expected, actual)
        if mismatch is not None:
            raise SemanticsError(f"pass '{pass_name}' changes the result of @{function.name}: {mismatch} "
                                 f"(random inputs, seed {seed}; replay with --seed={seed})")


class SemanticChecker:
    """An `after_pass` hook for the pass manager: checks every pass against the IR it received.

    The inputs are drawn once from the input module, so each pass sees the same arguments.
    """

    def __init__(self, module: Module, seed: int):
        self.seed = seed
        self.inputs = draw_inputs(module, seed)
        self.passes_checked = 0

    def __call__(self, pass_name: str, before: Module, after: Module) -> None:
        check_pass(pass_name, before, after, self.inputs, self.seed)
        self.passes_checked += 1
