"""Generated kernels, cached on disk and loaded as Python modules.

A kernel's cache key covers the region's FTIR text (without locations), the backend,
the capabilities, and the versions of flagtree, torch, triton and of this code
generator's own source, so editing the generator invalidates old kernels.  The cache
entry *is* the kernel's module file (its checksum header is a comment): Triton reads a
kernel's source with `inspect`, which needs a real file.  Triton's own compile cache
(`~/.triton/cache`, or $TRITON_CACHE_DIR) then keeps the compiled binaries, so a warm
process neither generates nor compiles.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import linecache
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import flagtree
from flagtree.backends.base import Capabilities
from flagtree.backends.triton.codegen import generate_kernel
from flagtree.ir.core import Operation
from flagtree.ir.printer import print_op
from flagtree.runtime.cache import DiskCache, cache_key

CACHE_NAMESPACE = "triton"

# Wraps a kernel function for launching: triton.jit's JITFunction on GPUs, Triton's
# interpreter on the CPU.  Arguments: the function and the names not to specialize on.
Jit = Callable[[Callable[..., Any], list[str]], Any]


@dataclass
class LoadedKernel:
    """A kernel ready to launch: `kernel[grid](...)`."""

    name: str
    key: str
    path: Path
    source: str
    launch: dict[str, Any]
    kernel: Any


@functools.cache
def versions() -> dict[str, str]:
    """Versions that invalidate cached kernels: packages and this generator's source."""
    import triton

    generator = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        generator.update(path.read_bytes())
    return {"flagtree": flagtree.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "generator": generator.hexdigest()}


class KernelLibrary:
    """The kernels of one backend: generated or found in the disk cache, wrapped by `jit`."""

    def __init__(self, backend: str, jit: Jit):
        self.backend = backend
        self.jit = jit
        self._loaded: dict[str, LoadedKernel] = {}

    def get(self, fusion: Operation, caps: Capabilities) -> LoadedKernel:
        """The kernel of `fusion`; raises UnsupportedRegion when none can be generated."""
        key = cache_key(print_op(fusion), self.backend, caps, options={}, versions=versions())
        path, source = DiskCache(CACHE_NAMESPACE).get_or_build(key, lambda: generate_kernel(fusion, caps).source,
                                                               suffix=".py")
        loaded = self._loaded.get(key)
        if loaded is None or loaded.source != source or loaded.path != path:
            loaded = self._load(key, path, source)
            self._loaded[key] = loaded
        return loaded

    def _load(self, key: str, path: Path, source: str) -> LoadedKernel:
        linecache.checkcache(str(path))  # the file may have been rebuilt since it was last read
        spec = importlib.util.spec_from_file_location(f"flagtree_kernel_{key[:16]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        launch = module.LAUNCH
        function = getattr(module, launch["kernel"])
        kernel = self.jit(function, launch["do_not_specialize"])
        return LoadedKernel(launch["kernel"], key, path, source, launch, kernel)
