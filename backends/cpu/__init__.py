"""The `cpu` backend: FTIR fusion regions → MLIR (linalg, tensor, arith, math) → LLVM → JIT.

Importing this package does not import torch_mlir; the backend imports it when it first
checks its availability or compiles.
"""

from flagtree.backends.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
