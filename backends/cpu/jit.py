"""MLIR on tensors → LLVM dialect → machine code in this process (MLIR's ExecutionEngine).

torch_mlir is imported here, on first use, never when the backend package is imported.
One MLIR context serves every compile (a lock serialises them); engines are cached by the
text they were built from, so a kernel compiled once in a process is never rebuilt.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from flagtree.errors import FlagtreeError

# Bufferize (writing results straight into the output memrefs), free temporaries, lower
# linalg to loops, then everything (attention's vector ops too) to the LLVM dialect.
# LLVM's -O3 (ExecutionEngine's opt_level) does the rest: it inlines the approximation
# helpers, hoists invariants and vectorises the inner loops for the host ISA.  No canonicalize before bufferization: it
# would fold the kernel's output copy loops into `memref.copy`s of strided views, which
# lower to a call into MLIR's C runner library (not shipped with the wheel).
LOWERING_PIPELINE = ",".join([
    "cse", "eliminate-empty-tensors", "one-shot-bufferize", "canonicalize",
    "buffer-deallocation-pipeline", "convert-bufferization-to-memref",
    "func.func(convert-linalg-to-loops)", "loop-invariant-code-motion", "convert-scf-to-cf",
    "expand-strided-metadata", "lower-affine", "convert-vector-to-llvm", "finalize-memref-to-llvm",
    "convert-math-to-llvm", "convert-math-to-libm", "convert-arith-to-llvm", "convert-index-to-llvm",
    "convert-func-to-llvm", "convert-cf-to-llvm", "convert-ub-to-llvm", "reconcile-unrealized-casts",
])
LLVM_OPT_LEVEL = 3


class JitError(FlagtreeError):
    """MLIR rejected a generated kernel or its lowering failed: a code generator bug."""


_lock = threading.Lock()
_context: Any = None
_engines: dict[str, Any] = {}


def _mlir() -> Any:
    """The torch_mlir modules, imported on first use; the context is created once."""
    global _context
    from torch_mlir import execution_engine, ir, passmanager

    if _context is None:
        _context = ir.Context()
    return ir, passmanager, execution_engine


def lower_to_llvm(mlir_text: str, name: str) -> str:
    """Run the lowering pipeline on a tensor-level module; returns LLVM-dialect MLIR text."""
    with _lock:
        ir, passmanager, _ = _mlir()
        with _context:
            module = _parse(ir, mlir_text, name)
            try:
                passmanager.PassManager.parse(f"builtin.module({LOWERING_PIPELINE})").run(module.operation)
            except Exception as e:  # MLIR reports pass failures as generic exceptions
                raise JitError(f"lowering kernel '{name}' to LLVM failed: {e}\n--- module ---\n{mlir_text}") from e
            return str(module)


def engine_for(llvm_text: str, name: str) -> Any:
    """An ExecutionEngine for an LLVM-dialect module, cached by its text."""
    with _lock:
        engine = _engines.get(llvm_text)
        if engine is not None:
            return engine
        ir, _, execution_engine = _mlir()
        with _context:
            module = _parse(ir, llvm_text, name)
            engine = execution_engine.ExecutionEngine(module, opt_level=LLVM_OPT_LEVEL)
            engine.raw_lookup("_mlir_ciface_" + name)  # compiles now, so the first call is not slow
        _engines[llvm_text] = engine
        return engine


def entry_point(engine: Any, name: str) -> Any:
    """The packed-argument C entry of kernel `name`: call it with an array of argument pointers."""
    address = engine.raw_lookup("_mlir_ciface_" + name)
    if not address:
        raise JitError(f"kernel '{name}' did not link (LLVM's JIT printed the unresolved symbols on stderr)")
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)


def parse_check(mlir_text: str, name: str = "module") -> None:
    """Parse and verify `mlir_text` with MLIR's own parser; raises JitError if it is invalid."""
    with _lock:
        ir, _, _ = _mlir()
        with _context:
            _parse(ir, mlir_text, name)


def _parse(ir: Any, text: str, name: str) -> Any:
    try:
        module = ir.Module.parse(text)
    except Exception as e:
        raise JitError(f"MLIR rejected the generated kernel '{name}': {e}\n--- module ---\n{text}") from e
    if not module.operation.verify():
        raise JitError(f"the generated kernel '{name}' does not verify\n--- module ---\n{text}")
    return module


def cached_engine_count() -> int:
    return len(_engines)
