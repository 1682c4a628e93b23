"""Block sizes and warp counts for generated kernels, from the target's capabilities.

Only `warp_size`, `max_threads_per_block` and `shared_memory_bytes` are read; no vendor
is named.  Elementwise kernels give each thread 16 bytes of its narrowest element type
(one vector load) and at least 8 elements; reductions keep a whole row in registers
("persistent") when it fits the register and shared-memory budget, else loop over it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flagtree.backends.base import Capabilities

_WARPS_PER_ELEMENTWISE_BLOCK = 4
_ELEMENTS_PER_THREAD_IN_A_ROW = 16  # fp32 registers per thread a persistent row may use
_ROW_TILE_ELEMENTS = 4096  # elements a reduction program handles at once (rows x row block)
_LOOPED_ROW_BLOCK = 1024  # row block of a looped reduction over a run-time extent
_MAX_ROWS_PER_PROGRAM = 64
_MAX_REDUCTION_WARPS = 16  # beyond this the cross-warp combine of each row costs more than it saves


@dataclass(frozen=True)
class ElementwiseTiling:
    block: int
    num_warps: int


@dataclass(frozen=True)
class ReductionTiling:
    rows: int  # rows per program
    row_block: int  # elements of a row per step (the whole row when persistent)
    persistent: bool
    num_warps: int


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _max_warps(caps: Capabilities) -> int:
    return max(1, caps.max_threads_per_block // max(1, caps.warp_size))


def elementwise_tiling(caps: Capabilities, numel: int | None, narrowest_bytes: int) -> ElementwiseTiling:
    """BLOCK and num_warps of a flat elementwise kernel over `numel` elements (None: dynamic)."""
    per_thread = max(8, 16 // max(1, narrowest_bytes))
    warps = min(_WARPS_PER_ELEMENTWISE_BLOCK, _max_warps(caps))
    block = _pow2_ceil(warps * caps.warp_size * per_thread)
    if numel is not None and numel < block:
        block = max(16, _pow2_ceil(numel))
        warps = max(1, min(warps, block // (caps.warp_size * per_thread)))
    return ElementwiseTiling(block, warps)


def max_persistent_row(caps: Capabilities) -> int:
    """The longest row a reduction keeps in registers: 16 fp32 values per thread of a full
    block, and a row's fp32 copy must fit shared memory (layout conversions stage it there)."""
    limit = caps.max_threads_per_block * _ELEMENTS_PER_THREAD_IN_A_ROW
    if caps.shared_memory_bytes:
        limit = min(limit, caps.shared_memory_bytes // 4)
    return _pow2_floor(limit)


def reduction_tiling(caps: Capabilities, num_rows: int | None, row_length: int | None) -> ReductionTiling:
    """Rows per program, row block and num_warps of a row reduction (None: dynamic size)."""
    persistent_limit = max_persistent_row(caps)
    if row_length is not None and _pow2_ceil(row_length) <= persistent_limit:
        row_block, persistent = _pow2_ceil(row_length), True
    else:
        row_block = min(persistent_limit, _LOOPED_ROW_BLOCK if row_length is None else 4 * _LOOPED_ROW_BLOCK)
        persistent = False
    rows = min(_MAX_ROWS_PER_PROGRAM, max(1, _pow2_floor(_ROW_TILE_ELEMENTS // row_block)))
    if num_rows is not None:
        rows = min(rows, _pow2_ceil(num_rows))
    elements = rows * row_block
    warps = min(_max_warps(caps), _MAX_REDUCTION_WARPS,
                max(1, elements // (caps.warp_size * _ELEMENTS_PER_THREAD_IN_A_ROW)))
    return ReductionTiling(rows, row_block, persistent, _pow2_floor(warps))
