"""The base of the backends that run generated Triton kernels (cuda, rocm, interpret).

compile: FTIR function → launch plan (backends/lowering.py), with one generated Triton
kernel per `ft.fusion` region, `ft.attention` through the flash-attention kernel
(attention.py); matmuls call torch (cuBLAS / hipBLAS), other ops their reference
implementations.  Subclasses say how kernels are wrapped (`jit`) and where
tensors live.
"""

from __future__ import annotations

import abc
from typing import Any

from flagtree.backends.base import Availability, Backend, Capabilities
from flagtree.backends.lowering import lower_function
from flagtree.backends.triton.attention import attention_lowering
from flagtree.backends.triton.attention_backward import attention_grad_lowering
from flagtree.backends.triton.launch import write_launch
from flagtree.backends.triton.library import KernelLibrary, LoadedKernel
from flagtree.ir.core import Module, Operation
from flagtree.runtime.plan import LaunchPlan, PlanWriter

INTEGER_TYPES = frozenset({"i1", "i8", "i16", "i32", "i64", "ui8"})


def triton_availability() -> Availability:
    """Whether Triton imports here (imported on first use, not with flagtree)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # any import failure makes the backend unavailable, with the reason
        return Availability(False, f"triton does not import: {type(e).__name__}: {e}")
    return Availability(True)


class TritonBackend(Backend):
    """Fusion regions → Triton kernels in a launch plan."""

    default_device = "cuda"

    def __init__(self) -> None:
        self._library: KernelLibrary | None = None

    @abc.abstractmethod
    def jit(self, function: Any, do_not_specialize: list[str]) -> Any:
        """Wrap a generated kernel function so that `kernel[grid](...)` launches it."""

    @property
    def library(self) -> KernelLibrary:
        if self._library is None:
            self._library = KernelLibrary(self.name, self.jit)
        return self._library

    def pipeline(self, capabilities: Capabilities) -> str:
        return "fuse-elementwise"

    def emit_forms(self) -> tuple[str, ...]:
        return ("triton", "python")

    def compile(self, module: Module, capabilities: Capabilities) -> LaunchPlan:
        return self.compile_with_kernels(module, capabilities)[0]

    def emit(self, module: Module, capabilities: Capabilities, form: str) -> str:
        if form == "python":
            return self.compile(module, capabilities).source
        if form == "triton":
            kernels = self.compile_with_kernels(module, capabilities)[1]
            return "\n\n".join(f"# ---- {k.name}: {k.path}\n{k.source}" for k in kernels)
        return super().emit(module, capabilities, form)

    def compile_with_kernels(self, module: Module, capabilities: Capabilities) -> tuple[LaunchPlan, list[LoadedKernel]]:
        """The launch plan of `@main` and the kernels it launches, in launch order."""
        kernels: list[LoadedKernel] = []

        def lower_fusion(op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
            kernel = self.library.get(op, capabilities)
            kernels.append(kernel)
            name = writer.bind(kernel.name, kernel.kernel)
            writer.note(f"{name}: ft.fusion at {op.location} -> {kernel.path}")
            return write_launch(kernel.launch, name, writer, operands)

        lowerings = {"ft.fusion": lower_fusion, "ft.attention": attention_lowering(self.name, self.jit, capabilities),
                     "ft.attention_grad": attention_grad_lowering(self.name, self.jit, capabilities)}
        plan = lower_function(module, self.name, lowerings, default_device=self.default_device)
        return plan, kernels
