"""flagtree: a torch.compile backend and AI compiler frontend.

`torch.compile(model, backend="flagtree")` works without importing this package first
(the backend is registered through the `torch_dynamo_backends` entry point).

    flagtree.reports()         what each graph compiled since clear_reports() became
    flagtree.clear_reports()
    flagtree.CompileOptions    the options torch.compile(..., options={...}) accepts
    flagtree.backend           the backend function itself (torch.compile(m, backend=flagtree.backend))

Importing flagtree stays light: torch and the compiler load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from flagtree.reports import Report, clear_reports, reports

__version__ = "0.1.0"

# name → (module, attribute), imported on first access.
_LAZY = {
    "CompileOptions": ("flagtree.frontend.options", "CompileOptions"),
    "backend": ("flagtree.frontend.backend", "flagtree_backend"),
}

__all__ = ["CompileOptions", "Report", "backend", "clear_reports", "reports"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flagtree' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
