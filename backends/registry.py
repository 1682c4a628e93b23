"""Find backends through the `flagtree.backends` entry-point group and pick one per device.

Selection order: an explicit name (the `target` option or $FLAGTREE_BACKEND) wins; else
the highest-priority available backend that supports the inputs' device.  A name that is
unknown or unavailable is an error naming it, saying why, and listing the valid names.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

import torch

from flagtree.backends.base import Backend
from flagtree.errors import FlagtreeError

ENTRY_POINT_GROUP = "flagtree.backends"


class BackendError(FlagtreeError):
    """No usable backend: the message names the request and lists the valid names."""


@functools.cache
def all_backends() -> dict[str, Backend]:
    """Every registered backend by name, highest priority first."""
    found: dict[str, Backend] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            backend = ep.load()()
        except Exception as e:  # a broken plugin must not break flagtree; it is reported instead
            found[ep.name] = _BrokenPlugin(ep.name, f"failed to load {ep.value}: {type(e).__name__}: {e}")
            continue
        if backend.name != ep.name:
            raise BackendError(f"entry point '{ep.name}' loads a backend named '{backend.name}'; they must match")
        found[backend.name] = backend
    return dict(sorted(found.items(), key=lambda kv: (-kv[1].priority, kv[0])))


def get_backend(name: str) -> Backend:
    """The backend called `name`; raises BackendError if it is unknown or unavailable here."""
    backends = all_backends()
    if name not in backends:
        raise BackendError(f"unknown backend '{name}'; registered backends: {', '.join(backends)}")
    availability = backends[name].availability()
    if not availability.ok:
        usable = [n for n, b in backends.items() if b.availability().ok]
        raise BackendError(f"backend '{name}' is not available here: {availability.reason}; "
                           f"available backends: {', '.join(usable)}")
    return backends[name]


def select_backend(device: torch.device, requested: str | None = None) -> Backend:
    """The backend to run graphs on `device`: `requested` if given, else the best available."""
    if requested:
        backend = get_backend(requested)
        if not backend.supports(device):
            raise BackendError(f"backend '{requested}' does not run on device '{device}'")
        return backend
    for backend in all_backends().values():
        if backend.supports(device) and backend.availability().ok:
            return backend
    raise BackendError(f"no available backend supports device '{device}'; registered: {', '.join(all_backends())}")


class _BrokenPlugin(Backend):
    """Stands in for a plugin that failed to load, so `flagtree backends` can say why."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def availability(self):
        from flagtree.backends.base import Availability

        return Availability(False, self.reason)

    def supports(self, device: torch.device) -> bool:
        return False

    def capabilities(self, device=None):
        raise BackendError(self.reason)

    def compile(self, module, capabilities):
        raise BackendError(self.reason)
