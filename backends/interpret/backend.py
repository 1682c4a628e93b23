"""The `interpret` backend: generated Triton kernels run by Triton's interpreter on CPU tensors.

Its capabilities describe a generic GPU (32-wide warps, 48 KiB of shared memory), so it
generates the kernels a GPU backend would.  It ranks above `reference` and below `cpu`:
it is the test vehicle of the GPU code generator, not a fast CPU path.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flagtree.backends.base import Availability, Capabilities
from flagtree.backends.triton.backend import INTEGER_TYPES, TritonBackend, triton_availability


class InterpretBackend(TritonBackend):
    name = "interpret"
    priority = 1
    default_device = "cpu"

    def availability(self) -> Availability:
        return triton_availability()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        return Capabilities(
            target="triton-interpreter",
            dtypes=frozenset({"f32", "f16", "bf16", *INTEGER_TYPES}),
            matrix_dtypes=frozenset({"f16", "bf16"}),
            shared_memory_bytes=48 * 1024,
            warp_size=32,
            max_threads_per_block=1024,
        )

    def jit(self, function: Any, do_not_specialize: list[str]) -> Any:
        return _interpreted_kernel(function, do_not_specialize)


def _interpreted_kernel(function: Any, do_not_specialize: list[str]) -> Any:
    """`function` as a kernel run by Triton's interpreter, in a process where
    TRITON_INTERPRET was not set when triton was imported (so a GPU backend in the same
    process still compiles for real).

    The interpreter is constructed directly.  One more step is needed: without
    TRITON_INTERPRET, triton.language's helpers written in Triton (tl.sum, tl.max, ...)
    were built as compiled-only JITFunctions.  The kernel's module therefore sees `tl`
    through a view that hands out interpreted twins of those helpers; nothing global is
    replaced for longer than a launch.  The real `triton.language` and
    `triton.language.core` stay in the module's globals: that is where the interpreter
    finds the modules whose builtins it emulates during a launch (and restores after).
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    class InterpretedKernel(InterpretedFunction):
        def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            with _exact_bfloat16_conversions():
                return super().run(*args, grid=grid, warmup=warmup, **kwargs)

    function.__globals__["tl"] = _InterpretedLanguage()
    function.__globals__["_triton_language"] = tl
    function.__globals__["_triton_language_core"] = tl.core
    return InterpretedKernel(function, do_not_specialize=do_not_specialize)


_conversion_lock = threading.RLock()


@contextlib.contextmanager
def _exact_bfloat16_conversions() -> Iterator[None]:
    """During a launch, convert f32 <-> bf16 with torch (round to nearest even, like the GPU).

    NumPy has no bfloat16, and Triton 3.6's interpreter truncates f32 -> bf16 by bit
    shifting, which doubles the rounding error of every bf16 result.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    emulated = InterpreterBuilder.cast_impl

    def cast_impl(builder: Any, src: Any, dst_type: Any) -> Any:
        source, target = src.dtype.scalar, dst_type.scalar
        if (source, target) == (tl.float32, tl.bfloat16):
            rounded = torch.from_numpy(src.data.astype(np.float32)).to(torch.bfloat16)
            return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), target)
        if (source, target) == (tl.bfloat16, tl.float32):
            widened = torch.from_numpy(src.data.view(np.int16)).view(torch.bfloat16).float()
            return TensorHandle(widened.numpy(), target)
        return emulated(builder, src, dst_type)

    with _conversion_lock:
        InterpreterBuilder.cast_impl = cast_impl
        try:
            yield
        finally:
            InterpreterBuilder.cast_impl = emulated


class _InterpretedLanguage(types.ModuleType):
    """triton.language, with its JITFunction helpers replaced by interpreted twins."""

    _twins: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__("triton.language")

    def __getattr__(self, name: str) -> Any:
        import triton.language as tl
        from triton.runtime.interpreter import FunctionRewriter
        from triton.runtime.jit import JITFunction

        if name == "range":
            return _range
        value = getattr(tl, name)
        if not isinstance(value, JITFunction):
            return value
        if name not in self._twins:
            # The helper's body rewritten for the interpreter, called as plain Python inside
            # the launch (InterpretedFunction.__call__ would patch triton.language for good).
            self._twins[name] = FunctionRewriter(value.fn).rewrite_ast()
        return self._twins[name]


def _range(*bounds: Any, **options: Any) -> range:
    """tl.range for the interpreter.  Triton 3.6's own turns a run-time bound (a 1-element
    array) into an int with `int(array)`, which NumPy 2.4 rejects; `.item()` works."""
    return range(*(b.handle.data.item() if hasattr(b, "handle") else b for b in bounds))
