"""The `reference` backend: every device, every dtype, eager torch op by op."""

from __future__ import annotations

import torch

from flagtree.backends.base import Availability, Backend, Capabilities
from flagtree.backends.reference.executor import ReferenceExecutable
from flagtree.ir.core import Module
from flagtree.ir.types import ELEMENT_TYPE_NAMES


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0  # the fallback: any codegen backend that supports the device wins

    def availability(self) -> Availability:
        return Availability(True)

    def supports(self, device: torch.device) -> bool:
        return True

    def capabilities(self, device: torch.device | None = None) -> Capabilities:
        return Capabilities(target="eager-torch", dtypes=frozenset(ELEMENT_TYPE_NAMES))

    def compile(self, module: Module, capabilities: Capabilities) -> ReferenceExecutable:
        return ReferenceExecutable(module)
