"""The `cpu` backend: fusion regions and attention → MLIR → LLVM → JIT-compiled kernels.

The executable is a launch plan (backends/lowering.py): each `ft.fusion` (linalg on tensors),
each `ft.attention` (a tiled online softmax, attention.py) and each `ft.gather_matmul` (an
MoE's matmul of gathered expert weights, gather_matmul.py) becomes one JIT-compiled kernel
call, matmuls call torch's BLAS, `ft.attention_grad` torch's CPU flash-attention backward
where it applies (attention_backward.py), every other op its eager reference.
Kernels are cached on disk as LLVM-dialect MLIR (the lowering pipeline's output), so a
process that finds a kernel there skips FTIR → MLIR and the pipeline, and only runs
LLVM's code generation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import torch

import flagtree
from flagtree.backends.base import Availability, Backend, Capabilities
from flagtree.backends.cpu.attention_backward import attention_grad_lowering
from flagtree.backends.cpu.gather_matmul import check_index
from flagtree.backends.cpu.host import host_cpu
from flagtree.backends.lowering import UnsupportedRegion, lower_function
from flagtree.errors import FlagtreeError
from flagtree.ir.core import Module, Operation
from flagtree.ir.printer import format_location, print_op
from flagtree.runtime.cache import DiskCache, cache_key
from flagtree.runtime.plan import LaunchPlan, PlanWriter

# Element types kernels load and store; f16/bf16 are computed in f32 (see mlir_text.compute_type).
_DTYPES = frozenset({"f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "i1"})
CACHE_NAMESPACE = "cpu"


class CpuBackend(Backend):
    name = "cpu"
    priority = 50  # above reference (0): the default for CPU tensors whenever torch-mlir is installed

    def availability(self) -> Availability:
        return _torch_mlir_availability()

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        cpu = host_cpu()
        return Capabilities(
            target="host-cpu",
            dtypes=_DTYPES,
            extra=tuple(sorted({"isa": cpu.isa, "vector_bits": cpu.vector_bits, "cores": cpu.cores,
                                "native_bf16": cpu.native_bf16}.items())),
        )

    def pipeline(self, capabilities: Capabilities) -> str:
        # fuse-gather-matmul first: its kernel reads an MoE's expert weights in place (no copy per token).
        # concat: a concatenation joins the kernel computing its pieces (a rotary embedding is one kernel).
        return "fuse-gather-matmul,fuse-elementwise{concat=true}"

    def compile(self, module: Module, capabilities: Capabilities) -> LaunchPlan:
        kernels = _KernelCompiler(capabilities)
        return lower_function(module, self.name, {"ft.fusion": kernels, "ft.attention": kernels,
                                                  "ft.gather_matmul": _GatherMatmulLowering(kernels),
                                                  "ft.attention_grad": attention_grad_lowering})

    def emit_forms(self) -> tuple[str, ...]:
        return ("mlir", "python")

    def emit(self, module: Module, capabilities: Capabilities, form: str) -> str:
        if form == "python":
            return self.compile(module, capabilities).source
        if form == "mlir":
            from flagtree.backends.cpu.compiler import module_mlir

            return module_mlir(module)
        return super().emit(module, capabilities, form)


@functools.cache
def _torch_mlir_availability() -> Availability:
    if importlib.util.find_spec("torch_mlir") is None:
        return Availability(False, "torch-mlir is not installed (pip install torch-mlir, or flagtree[mlir])")
    try:
        importlib.import_module("torch_mlir.execution_engine")
    except Exception as e:  # a broken install must make the backend unavailable, not crash selection
        return Availability(False, f"torch-mlir does not import: {type(e).__name__}: {e}")
    return Availability(True)


class _KernelCompiler:
    """The launch-plan callback: each ft.fusion or ft.attention becomes a call of its compiled kernel."""

    def __init__(self, capabilities: Capabilities):
        self.capabilities = capabilities
        self.cache = DiskCache(CACHE_NAMESPACE)

    def __call__(self, op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
        from flagtree.backends.cpu import compiler

        key = cache_key(print_op(op), CACHE_NAMESPACE, self.capabilities, {}, _versions())
        path, llvm_text = self.cache.get_or_build(key, lambda: _lowered_kernel(op), ".mlir")
        kernel = compiler.kernel_from_llvm(op, llvm_text)
        name = writer.bind(compiler.kernel_label(op), kernel)
        kernel.label = name
        writer.note(f"{name}: {op.name} at {format_location(op.location)}, kernel {path}")
        results = [writer.new_buffer() for _ in op.results]
        writer.line(f"{', '.join(results)}{',' if len(results) == 1 else ''} = {name}({', '.join(operands)})")
        return results


class _GatherMatmulLowering:
    """ft.gather_matmul: a range check of its index (the kernel reads the weights unchecked), then its
    kernel.  An MoE's gate, up and down projections share one index: it is checked once per plan."""

    def __init__(self, kernels: _KernelCompiler):
        self.kernels = kernels
        self.checked: set[tuple[str, str]] = set()  # (index, number of matrices) as plan expressions

    def __call__(self, op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
        experts = op.operands[1].type.shape[0]
        check = (operands[2], str(experts) if experts is not None else f"{operands[1]}.shape[0]")
        if check not in self.checked:
            self.checked.add(check)
            writer.line(f"{writer.bind('check_index', check_index)}({', '.join(check)})")
        return self.kernels(op, writer, operands)


def _lowered_kernel(op: Operation) -> str:
    """The LLVM-dialect module of the kernel computing `op` (what the disk cache stores)."""
    from flagtree.backends.cpu import compiler
    from flagtree.backends.cpu.mlir_text import UnsupportedError

    try:
        mlir_text = compiler.tensor_level_mlir(op)
    except UnsupportedError as e:
        raise UnsupportedRegion(str(e)) from None
    llvm_text = compiler.llvm_level_mlir(mlir_text)
    if "@memrefCopy" in llvm_text:
        # Bufferization copied a strided view; that copy lives in MLIR's C runner library,
        # which the torch-mlir wheel does not ship, so the kernel could not link.
        raise UnsupportedRegion("its lowering copies a strided view (memrefCopy), which this MLIR build cannot link")
    return llvm_text


@functools.cache
def _versions() -> dict[str, str]:
    """What the generated code depends on besides the unit: a kernel cached by another version
    of flagtree, torch, MLIR or of this code generator is never reused."""
    sources = sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    try:
        mlir = importlib.metadata.version("torch-mlir")
    except importlib.metadata.PackageNotFoundError as e:
        raise FlagtreeError("the cpu backend needs torch-mlir (pip install torch-mlir)") from e
    return {"flagtree": flagtree.__version__, "torch": torch.__version__, "torch-mlir": mlir, "codegen": digest}
