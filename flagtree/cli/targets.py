"""The backends the command-line tools know about, until the backend registry exists.

They are the frontend's compile targets: `flagtree backends` lists them and
`flagtree-opt --target` accepts only them. The registry with `is_available()` and device
selection comes with the codegen backends and replaces this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from flagtree.errors import OptionsError
from flagtree.frontend.options import TARGETS


@dataclass(frozen=True)
class BackendStatus:
    """One backend as `flagtree backends` lists it."""

    name: str
    available: bool
    reason: str


_DESCRIPTIONS = {
    "reference": "runs every FTIR op with eager torch (the ground truth); needs only torch",
}
# Every target the frontend can compile for; each needs a description above.
BACKENDS = tuple(BackendStatus(name, True, _DESCRIPTIONS[name]) for name in TARGETS)
NOT_YET_REGISTERED = ("no other backends are registered yet: the backend registry and the codegen backends "
                      "(cuda/rocm via Triton, cpu via MLIR, interpret) come with a later issue")


def require_target(name: str) -> BackendStatus:
    """The status of backend `name`; raises OptionsError naming the known ones if it is not one."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    known = ", ".join(b.name for b in BACKENDS)
    raise OptionsError(f"--target={name} is not available yet: the known backends are {known} ({NOT_YET_REGISTERED})")
