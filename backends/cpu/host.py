"""Facts about the host CPU the JIT compiles for (LLVM targets the host's full ISA)."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# (flag in /proc/cpuinfo, ISA name, vector register bits), best first.
_X86_LEVELS = (("avx512f", "avx512", 512), ("avx2", "avx2", 256), ("avx", "avx", 256), ("sse2", "sse2", 128))


@dataclass(frozen=True)
class HostCpu:
    isa: str  # the widest SIMD extension: avx512, avx2, avx, sse2, neon, or the machine name
    vector_bits: int
    native_bf16: bool  # bf16 dot-product instructions (avx512_bf16 / ARM bf16)
    cores: int


@functools.cache
def host_cpu() -> HostCpu:
    """The host's SIMD level, read once from /proc/cpuinfo (Linux) or the platform."""
    flags = _cpuinfo_flags()
    cores = os.cpu_count() or 1
    for flag, isa, bits in _X86_LEVELS:
        if flag in flags:
            return HostCpu(isa, bits, "avx512_bf16" in flags, cores)
    if "asimd" in flags or platform.machine() in ("arm64", "aarch64"):
        return HostCpu("neon", 128, "bf16" in flags, cores)
    return HostCpu(platform.machine() or "unknown", 128, False, cores)


def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()
