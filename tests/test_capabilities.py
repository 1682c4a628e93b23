"""Capabilities.describe(), which `flagtree backends` and the benchmarks' JSON print."""

from __future__ import annotations

from flagtree.backends.base import Capabilities


def test_describe_writes_byte_counts_with_units():
    caps = Capabilities("cuda:sm_90", frozenset({"f32", "bf16"}), shared_memory_bytes=232448, warp_size=32,
                        extra=(("l2_bytes", 60 * 2**20), ("multiprocessors", 132), ("odd_bytes", 1000)))
    assert caps.describe() == "dtypes=bf16,f32 smem=227KiB warp=32 l2=60MiB multiprocessors=132 odd=1000B"
