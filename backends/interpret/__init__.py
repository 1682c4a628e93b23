"""The `interpret` backend: the GPU backends' generated Triton kernels, run by Triton's
interpreter on CPU tensors, so machines without a GPU exercise the GPU code generator."""

from flagtree.backends.interpret.backend import InterpretBackend

__all__ = ["InterpretBackend"]
