"""Launching a Triton kernel whose non-tensor arguments are fixed, with little host time.

The attention kernels take 60-100 arguments, and for one call signature (shapes, strides,
dtypes, attributes) every argument but the tensors is the same on every call.  Triton's
`kernel[grid](...)` binds and specialises all of them on each launch: on the H200 machine's
host the backward's two launches took 190-360 µs of host time per call, and with
aot_autograd's wrappers on top the compiled backward at length 4096 (500 µs of GPU time) was
host-bound in one benchmark run; through FixedLaunch the two launches take 130 µs.

`FixedLaunch` sends the first call for each key through Triton's JIT, which compiles (or
finds) the kernel and returns it, and launches later calls with the same key through that
compiled kernel directly (`compiled[grid](*arguments)`, Triton's own launcher).  The key is
what Triton specialises a tensor argument on: its dtype and whether its address is a multiple
of 16 (and None where a call passes no tensor).  Where the JIT returns no compiled kernel
(Triton's interpreter, or a Triton whose compiled kernels cannot be launched so), every call
goes through the JIT.
"""

from __future__ import annotations

from typing import Any

import torch

TRITON_ALIGNMENT = 16  # Triton specialises pointer arguments on this divisibility


class FixedLaunch:
    """`kernel` on `grid` with the arguments `fixed` (sizes, strides, constexprs, and the launch
    options num_warps / num_stages); each call passes the rest, by name."""

    def __init__(self, kernel: Any, grid: tuple[int, ...], fixed: dict[str, Any]):
        self.kernel = kernel
        self.grid = (*grid, *(1,) * (3 - len(grid)))
        self.fixed = fixed
        self._launchers: dict[tuple, Any] = {}
        self._arguments: list[Any] = []  # every argument in the kernel's order, the fixed ones filled in
        self._slots: list[tuple[int, str]] = []  # where the varying ones go

    def __call__(self, **varying: Any) -> None:
        key = tuple(_alignment(value) for value in varying.values())
        launcher = self._launchers.get(key)
        if launcher is None:
            compiled = self.kernel[self.grid](**varying, **self.fixed)
            if hasattr(compiled, "__getitem__") and hasattr(self.kernel, "arg_names"):
                # the argument template first: another thread may take the launcher once it is stored
                self._arguments = [self.fixed.get(name) for name in self.kernel.arg_names]
                self._slots = [(i, name) for i, name in enumerate(self.kernel.arg_names) if name in varying]
                self._launchers[key] = compiled[self.grid]
            return
        arguments = list(self._arguments)
        for i, name in self._slots:
            arguments[i] = varying[name]
        launcher(*arguments)


def _alignment(value: Any) -> Any:
    """What Triton specialises a varying argument on."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % TRITON_ALIGNMENT == 0
    return None if value is None else type(value)
