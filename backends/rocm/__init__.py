"""The `rocm` backend: the cuda backend's Triton path on AMD GPUs (a ROCm build of torch)."""

from flagtree.backends.rocm.backend import RocmBackend

__all__ = ["RocmBackend"]
