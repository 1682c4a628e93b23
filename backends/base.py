"""The backend contract, in the spirit of Triton's `BaseBackend`.

A backend is a small class: its `name` and `priority`, whether it can run here
(`availability()`, with a reason when not), which devices it `supports`, the
`capabilities` of a target chip (which lowering passes read instead of vendor checks),
the lowering `pipeline` it appends to the optimisation preset, and `compile`, which
turns an optimised FTIR module into an `Executable`.

Backends are found through the `flagtree.backends` entry-point group; the built-in ones
register the same way as third-party plugins (see setup.py and backends/registry.py).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from flagtree.ir.core import Module


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine, and why not."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What a target chip can do natively; lowering passes decide from these.

    Frozen and hashable so compiled-kernel caches can key on them.
    """

    target: str
    dtypes: frozenset[str]  # element types computed natively (others are legalised to f32)
    matrix_dtypes: frozenset[str] = frozenset()  # element types with matrix-unit support
    shared_memory_bytes: int = 0  # per block / workgroup; 0 = not applicable
    warp_size: int = 1
    max_threads_per_block: int = 1
    extra: tuple[tuple[str, Any], ...] = field(default=())  # vendor-specific facts, as sorted pairs

    def describe(self) -> str:
        parts = [f"dtypes={','.join(sorted(self.dtypes))}"]
        if self.matrix_dtypes:
            parts.append(f"matrix={','.join(sorted(self.matrix_dtypes))}")
        if self.shared_memory_bytes:
            parts.append(f"smem={self.shared_memory_bytes // 1024}KiB")
        if self.warp_size > 1:
            parts.append(f"warp={self.warp_size}")
        parts.extend(f"{k.removesuffix('_bytes')}={_size(v)}" if k.endswith("_bytes") else f"{k}={v}"
                     for k, v in self.extra)
        return " ".join(parts)


def _size(n: int) -> str:
    """A byte count the way people write it: 60MiB, 228KiB, 100B."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


class Executable(Protocol):
    """A compiled graph: call it with the graph's inputs, get its outputs."""

    backend: str

    def __call__(self, *args: Any) -> list[Any]: ...


class Backend(abc.ABC):
    """Base class of every backend; subclasses set `name` and `priority`."""

    name: str = ""
    priority: int = 0  # the highest-priority available backend that supports a device wins
    # Its executables queue their work on the current CUDA stream, so mode="reduce-overhead" may
    # record them into CUDA graphs (one that cannot be recorded still runs, without a graph).
    cuda_graphs: bool = False

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run here; cheap, never raises."""

    @abc.abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs graphs whose tensors live on `device`."""

    @abc.abstractmethod
    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        """The target chip's capabilities (the current device when None)."""

    def pipeline(self, capabilities: Capabilities) -> str:
        """Lowering passes appended after the optimisation preset (empty by default)."""
        return ""

    @abc.abstractmethod
    def compile(self, module: Module, capabilities: Capabilities) -> Executable:
        """Turn an optimised, verified FTIR module into an executable."""

    def emit_forms(self) -> tuple[str, ...]:
        """The artifact forms `emit` can print (e.g. "mlir", "triton", "python")."""
        return ()

    def emit(self, module: Module, capabilities: Capabilities, form: str) -> str:
        """The text of one compile artifact (`flagtree-opt --emit=FORM`) for `module`."""
        raise NotImplementedError(f"backend '{self.name}' cannot emit '{form}'; it emits: "
                                  f"{', '.join(self.emit_forms()) or 'nothing'}")
