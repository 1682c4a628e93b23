"""The `rocm` backend: the cuda backend's Triton path on AMD GPUs (torch.version.hip)."""

from __future__ import annotations

import torch

from flagtree.backends.base import Availability, Capabilities
from flagtree.backends.cuda.backend import CudaBackend, _device_index, _shared_memory_per_block
from flagtree.backends.triton.backend import INTEGER_TYPES, triton_availability

# Architectures with OCP fp8 (e4m3fn / e5m2); gfx94x has only the fnuz variants FTIR lacks.
_OCP_FP8_ARCHS = ("gfx950", "gfx12")


class RocmBackend(CudaBackend):
    name = "rocm"

    def availability(self) -> Availability:
        if not torch.version.hip:
            return Availability(False, "torch is not a ROCm build (torch.version.hip is None)")
        if not torch.cuda.is_available():
            return Availability(False, "torch.cuda.is_available() is False: no AMD GPU is visible")
        return triton_availability()

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        props = torch.cuda.get_device_properties(_device_index(device))
        arch = props.gcnArchName.split(":")[0]
        dtypes = {"f64", "f32", "f16", "bf16", *INTEGER_TYPES}
        matrix = {"f16", "bf16", "i8"}
        if arch.startswith(_OCP_FP8_ARCHS):
            dtypes |= {"f8E4M3FN", "f8E5M2"}
            matrix |= {"f8E4M3FN", "f8E5M2"}
        return Capabilities(
            target=f"rocm:{arch}",
            dtypes=frozenset(dtypes),
            matrix_dtypes=frozenset(matrix),
            shared_memory_bytes=_shared_memory_per_block(props),
            warp_size=getattr(props, "warp_size", 64),
            max_threads_per_block=getattr(props, "max_threads_per_block", 1024),
            extra=(("device", props.name), ("l2_bytes", getattr(props, "L2_cache_size", 0)),
                   ("multiprocessors", props.multi_processor_count)),
        )
