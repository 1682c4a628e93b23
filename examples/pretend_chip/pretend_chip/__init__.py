"""pretend-chip: a sample out-of-tree flagtree backend (see README.md).

A pretend accelerator without bf16 and with 16 KiB of shared memory.  Its lowering pipeline
is a function of its Capabilities only, so the same code serves any chip those describe.
"""

from __future__ import annotations

import torch

from flagtree.backends.base import Availability, Backend, Capabilities
from flagtree.backends.reference.executor import ReferenceExecutable
from flagtree.errors import FlagtreeError
from flagtree.ir.core import Module
from flagtree.ir.types import TensorType
from flagtree.passes.legalize_dtypes import computes_on_tensors

NATIVE_DTYPES = frozenset({"f32", "f16", "i1", "i8", "i16", "i32", "i64", "ui8"})
SHARED_MEMORY_BYTES = 16 * 1024
# A fused kernel keeps one tile per op resident in shared memory: 256 f32 elements.
TILE_BYTES_PER_OP = 256 * 4


def lowering_pipeline(capabilities: Capabilities) -> str:
    """The passes a chip with `capabilities` needs: computations in types it lacks move to f32,
    and fused kernels hold at most as many ops as its shared memory holds tiles."""
    native = ",".join(sorted(capabilities.dtypes))
    fuse = "fuse-elementwise"
    if capabilities.shared_memory_bytes:
        fuse += f"{{max-ops={max(1, capabilities.shared_memory_bytes // TILE_BYTES_PER_OP)}}}"
    return f"legalize-dtypes{{native=[{native}]}},{fuse}"


class UnsupportedOnChip(FlagtreeError):
    """The module computes in an element type the chip lacks: its pipeline did not run."""


class PretendChipExecutable(ReferenceExecutable):
    """The pretend chip's "hardware" is the CPU: the lowered module runs op by op."""

    backend = "pretend-chip"


class PretendChipBackend(Backend):
    name = "pretend-chip"
    priority = -10  # a demonstration: never chosen over a built-in backend unless asked for

    def availability(self) -> Availability:
        return Availability(True)

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        return Capabilities(
            target="pretend-chip-v1",
            dtypes=NATIVE_DTYPES,
            matrix_dtypes=frozenset({"f16"}),
            shared_memory_bytes=SHARED_MEMORY_BYTES,
            warp_size=16,
            max_threads_per_block=256,
        )

    def pipeline(self, capabilities: Capabilities) -> str:
        return lowering_pipeline(capabilities)

    def compile(self, module: Module, capabilities: Capabilities) -> PretendChipExecutable:
        _check_native(module, capabilities)
        return PretendChipExecutable(module)


def _check_native(module: Module, capabilities: Capabilities) -> None:
    for op in module.walk():
        if not computes_on_tensors(op):
            continue
        for value in [*op.operands, *op.results]:
            if isinstance(value.type, TensorType) and value.type.dtype.name not in capabilities.dtypes:
                raise UnsupportedOnChip(
                    f"{op.location}: '{op.name}' op computes in {value.type.dtype}, which {capabilities.target} "
                    f"lacks; run the backend's pipeline ({lowering_pipeline(capabilities)}) before compile()")
