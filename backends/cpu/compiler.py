"""Compile kernel units (an ft.fusion region, an ft.attention or ft.gather_matmul op, or a lone
elementwise/reduction op) to CpuKernels, and print a module's kernels as one MLIR module (`--emit=mlir`)."""

from __future__ import annotations

import threading

from flagtree.backends.cpu import attention, gather_matmul, jit
from flagtree.backends.cpu.emitter import EmittedKernel, KernelUnit, emit_kernel, module_text
from flagtree.backends.cpu.kernel import CpuKernel
from flagtree.backends.cpu.mlir_text import UnsupportedError
from flagtree.backends.cpu.tiling import row_values
from flagtree.ir.core import Module, Operation
from flagtree.ir.printer import format_location

KERNEL_SYMBOL = "kernel"  # every JIT module holds one kernel under this name, so equal kernels share text
KERNEL_OPS = ("ft.fusion", "ft.attention", "ft.gather_matmul")  # the top-level ops that become kernels

_lowered: dict[str, str] = {}  # tensor-level MLIR text → LLVM-dialect text, this process
_lowered_lock = threading.Lock()


def kernel_unit(op: Operation, name: str = KERNEL_SYMBOL) -> KernelUnit:
    """The unit an op compiles as: its fusion region, or the op itself."""
    return KernelUnit.from_fusion(op, name) if op.name == "ft.fusion" else KernelUnit.from_op(op, name)


def kernel_label(op: Operation) -> str:
    """A readable kernel name from the ops it computes, like Inductor's: `fused_add_silu_mul`."""
    ops = op.regions[0].block.ops if op.name == "ft.fusion" else [op]
    names: list[str] = []
    for inner in ops:
        if inner.name not in ("ft.yield", "ft.constant", "ft.cast") and inner.short_name not in names:
            names.append(inner.short_name)
    return "fused_" + "_".join(names[:3] or ["copy"])


def tensor_level_mlir(op: Operation) -> str:
    """The MLIR module (linalg on tensors; scf and vector on memrefs for attention) of the
    kernel that computes `op`."""
    return _emitted(op, KERNEL_SYMBOL).module()


def _emitted(op: Operation, name: str) -> EmittedKernel:
    if op.name == "ft.attention":
        return attention.emit_attention(op, name)
    if op.name == "ft.gather_matmul":
        return gather_matmul.emit_gather_matmul(op, name)
    unit = kernel_unit(op, name)
    return emit_kernel(unit, row_values(unit))


def llvm_level_mlir(mlir_text: str) -> str:
    """`mlir_text` lowered to the LLVM dialect (cached in-process by the input text)."""
    with _lowered_lock:
        cached = _lowered.get(mlir_text)
    if cached is None:
        cached = jit.lower_to_llvm(mlir_text, KERNEL_SYMBOL)
        with _lowered_lock:
            _lowered[mlir_text] = cached
    return cached


def kernel_from_llvm(op: Operation, llvm_text: str, label: str = "") -> CpuKernel:
    """A callable kernel for `op` from its LLVM-dialect module (JIT-compiled once per text)."""
    engine = jit.engine_for(llvm_text, KERNEL_SYMBOL)
    unit = kernel_unit(op)
    entry, label = jit.entry_point(engine, KERNEL_SYMBOL), label or kernel_label(op)
    if op.name == "ft.attention":
        return CpuKernel(unit, entry, engine, label, None, attention.work_items(op), attention.strides(op),
                         attention.worth_splitting(op))
    if op.name == "ft.gather_matmul":
        return CpuKernel(unit, entry, engine, label, None, gather_matmul.work_items)
    return CpuKernel(unit, entry, engine, label, row_values(unit))


def compile_op(op: Operation, label: str = "") -> CpuKernel:
    """Compile the kernel computing `op` (one of KERNEL_OPS, or one elementwise/reduction op); raises
    UnsupportedError if the code generator cannot lower it."""
    return kernel_from_llvm(op, llvm_level_mlir(tensor_level_mlir(op)), label)


def module_mlir(module: Module) -> str:
    """Every kernel op (KERNEL_OPS) of `module` as one MLIR module, a function per kernel
    named `@<function>_<label>_<n>`; ops the code generator cannot lower are listed in a
    comment (they run in eager torch)."""
    kernels: list[EmittedKernel] = []
    notes: list[str] = []
    for func in module.functions:
        kernel_ops = [op for op in func.regions[0].block.ops if op.name in KERNEL_OPS]
        for index, op in enumerate(kernel_ops):
            name = f"{func.attributes['sym_name']}_{kernel_label(op)}_{index}"
            try:
                kernels.append(_emitted(op, name))
            except UnsupportedError as e:
                notes.append(f"// {op.name} at {format_location(op.location)} runs in eager torch: {e}")
    return "".join(n + "\n" for n in notes) + module_text(kernels)
