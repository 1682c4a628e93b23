"""The `cuda` backend: generated Triton kernels and cuBLAS on NVIDIA GPUs."""

from flagtree.backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
