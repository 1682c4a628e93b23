"""MLIR on tensors → LLVM dialect → machine code in this process (MLIR's ExecutionEngine).

torch_mlir is imported here, on first use, never when the backend package is imported.
One MLIR context serves every compile (a lock serialises them); engines are cached by the
text they were built from, so a kernel compiled once in a process is never rebuilt.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
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
# LLVM options for the kernels' code generation, parsed once per process (below).  By default LLVM
# fully unrolls loops of a few iterations before its loop vectoriser runs, and the vectoriser skips
# loops of fewer than 16: the small static inner dims of fusion kernels (8 experts, the halves of a
# rotary head, a reduction over 2 experts per token) then run as scalar code.  These keep such loops
# for the vectoriser (measured on the zoo: a 256x8 sigmoid+add 21 -> 9 us, rotary halves 17 -> 7 us,
# 6% of a transformer block's or MoE layer's call).
LLVM_OPTIONS = ("-vectorizer-min-trip-count=2", "-unroll-full-max-count=2")
# The library holding torch-mlir's LLVM, whose C API takes the options.
_LLVM_LIBRARY = "libTorchMLIRAggregateCAPI"

logger = logging.getLogger("flagtree")


class JitError(FlagtreeError):
    """MLIR rejected a generated kernel or its lowering failed: a code generator bug."""


_lock = threading.Lock()
_context: Any = None
_engines: dict[str, Any] = {}
_llvm_options_parsed = False


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
        _parse_llvm_options()
        with _context:
            module = _parse(ir, llvm_text, name)
            engine = execution_engine.ExecutionEngine(module, opt_level=LLVM_OPT_LEVEL)
            engine.raw_lookup("_mlir_ciface_" + name)  # compiles now, so the first call is not slow
        _engines[llvm_text] = engine
        return engine


def llvm_library() -> Path | None:
    """torch-mlir's library holding its LLVM, whose C API takes LLVM_OPTIONS (None if it has none)."""
    import torch_mlir._mlir_libs

    found = [p for folder in torch_mlir._mlir_libs.__path__ for p in sorted(Path(folder).glob(_LLVM_LIBRARY + ".*"))]
    return found[0] if found else None


def _parse_llvm_options() -> None:
    """Give LLVM_OPTIONS to torch-mlir's LLVM, once per process (the caller holds `_lock`).  LLVM's C
    API ignores options it does not know (tests/test_cpu_backend.py checks that this LLVM has them);
    without the library, kernels are still correct, only slower in small loops, and a warning says so."""
    global _llvm_options_parsed
    if _llvm_options_parsed:
        return
    _llvm_options_parsed = True
    library = llvm_library()
    parse = getattr(ctypes.CDLL(str(library)), "LLVMParseCommandLineOptions", None) if library else None
    if parse is None:
        logger.warning("flagtree cpu backend: %s with LLVMParseCommandLineOptions is not in torch-mlir's libraries; "
                       "kernels run without %s (small loops stay scalar)", _LLVM_LIBRARY, " ".join(LLVM_OPTIONS))
        return
    arguments = [b"flagtree", *(option.encode() for option in LLVM_OPTIONS)]
    parse(len(arguments), (ctypes.c_char_p * len(arguments))(*arguments), b"")


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
