"""Triton code generation shared by the GPU backends (and the interpreter backend).

One kernel per `ft.fusion` region (codegen.py), launched from the launch plan
(launch.py), cached on disk (library.py); `TritonBackend` (backend.py) is the base of
the `cuda`, `rocm` and `interpret` backends.
"""

from flagtree.backends.triton.backend import TritonBackend
from flagtree.backends.triton.codegen import KernelSource, generate_kernel

__all__ = ["KernelSource", "TritonBackend", "generate_kernel"]
