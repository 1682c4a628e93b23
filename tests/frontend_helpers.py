"""Numerics helpers shared by the frontend tests: fp64 references and DESIGN.md's tolerances."""

from __future__ import annotations

import copy
from typing import Any

import torch

from flagtree.backends.registry import select_backend

# The backend flagtree picks for CPU tensors on this machine (cpu when torch-mlir is installed).
DEFAULT_CPU_BACKEND = select_backend(torch.device("cpu")).name
# Relative L2 error vs an fp64 reference (DESIGN.md, "Tests").
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """||actual - reference|| / ||reference|| in fp64; NaN or inf anywhere gives inf, so it never passes."""
    actual, reference = actual.double(), reference.double()
    if not (torch.isfinite(actual).all() and torch.isfinite(reference).all()):
        return float("inf")
    diff = (actual - reference).norm().item()
    scale = reference.norm().item()
    return diff / scale if scale > 0 else diff


def fp64_twin(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.nn.Module, list[Any]]:
    """The same model and inputs in fp64 (the weights exactly as `model` holds them)."""
    twin = copy.deepcopy(model).double()
    return twin, [t.double() if t.is_floating_point() else t for t in inputs]


def assert_matches_fp64(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = relative_error(actual, reference)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} vs fp64 exceeds {TOLERANCE[dtype]:g}"
