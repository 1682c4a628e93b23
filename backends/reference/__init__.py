"""The reference backend: runs any FTIR module op by op with eager torch.

It is the ground truth the other backends and every pass are checked against, and the
backend compiled models use until a codegen backend claims their device.
"""

from flagtree.backends.reference.backend import ReferenceBackend
from flagtree.backends.reference.executor import ReferenceExecutable, run_module

__all__ = ["ReferenceBackend", "ReferenceExecutable", "run_module"]
