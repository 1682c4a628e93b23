"""The `cuda` backend: fusion regions as generated Triton kernels, matmuls on cuBLAS."""

from __future__ import annotations

from typing import Any

import torch

from flagtree.backends.base import Availability, Capabilities
from flagtree.backends.triton.backend import INTEGER_TYPES, TritonBackend, triton_availability

_FP8 = frozenset({"f8E4M3FN", "f8E5M2"})


class CudaBackend(TritonBackend):
    name = "cuda"
    priority = 100
    default_device = "cuda"
    cuda_graphs = True

    def availability(self) -> Availability:
        if torch.version.hip:
            return Availability(False, f"torch is a ROCm build (HIP {torch.version.hip}); the rocm backend runs it")
        if torch.version.cuda is None:
            return Availability(False, "torch is a CPU-only build (torch.version.cuda is None)")
        if not torch.cuda.is_available():
            return Availability(False, "torch.cuda.is_available() is False: no NVIDIA GPU or driver is visible")
        return triton_availability()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        props = torch.cuda.get_device_properties(_device_index(device))
        compute_capability = (props.major, props.minor)
        dtypes = {"f64", "f32", "f16", *INTEGER_TYPES}
        matrix = {"f16", "i8"}
        if compute_capability >= (8, 0):
            dtypes.add("bf16")
            matrix.add("bf16")
        if compute_capability >= (8, 9):
            dtypes |= _FP8
            matrix |= _FP8
        return Capabilities(
            target=f"cuda:sm_{props.major}{props.minor}",
            dtypes=frozenset(dtypes),
            matrix_dtypes=frozenset(matrix),
            shared_memory_bytes=_shared_memory_per_block(props),
            warp_size=32,
            max_threads_per_block=getattr(props, "max_threads_per_block", 1024),
            extra=(("device", props.name), ("l2_bytes", getattr(props, "L2_cache_size", 0)),
                   ("multiprocessors", props.multi_processor_count)),
        )

    def jit(self, function: Any, do_not_specialize: list[str]) -> Any:
        from triton.runtime.jit import JITFunction

        return JITFunction(function, do_not_specialize=do_not_specialize)


def _device_index(device: torch.device | None) -> int:
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


def _shared_memory_per_block(props: Any) -> int:
    """The opt-in maximum (what a kernel may request) when torch reports it."""
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
