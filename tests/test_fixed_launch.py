"""FixedLaunch (backends/triton/fixed_launch.py): the first call per tensor alignment goes through
the JIT; later calls launch the compiled kernel it returned with every argument in the kernel's
order.  A stand-in JIT records what each path receives, so these run without a GPU (Triton's
interpreter returns no compiled kernel, so under it every call takes the JIT path, which the
attention tests exercise)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.backends.triton.fixed_launch import FixedLaunch

ARG_NAMES = ["x", "out", "mask", "n", "stride", "BLOCK"]


class RecordingKernel:
    """Stands in for a JITFunction: `kernel[grid](**kwargs)` records the call and returns a
    compiled kernel (or None, like the interpreter) whose `[grid](*args)` records too."""

    arg_names = ARG_NAMES

    def __init__(self, returns_compiled: bool = True):
        self.returns_compiled = returns_compiled
        self.jit_calls: list[tuple[tuple, dict]] = []
        self.direct_calls: list[tuple[tuple, tuple]] = []

    def __getitem__(self, grid):
        def jit(**kwargs):
            self.jit_calls.append((grid, kwargs))
            return _Compiled(self) if self.returns_compiled else None

        return jit


class _Compiled:
    def __init__(self, owner: RecordingKernel):
        self.owner = owner

    def __getitem__(self, grid):
        return lambda *args: self.owner.direct_calls.append((grid, args))


FIXED = {"n": 10, "stride": 3, "BLOCK": 16, "num_warps": 4}


def test_later_calls_launch_the_compiled_kernel_with_every_argument_in_order():
    kernel = RecordingKernel()
    launch = FixedLaunch(kernel, (5,), FIXED)
    x, out = torch.zeros(8), torch.zeros(8)
    launch(x=x, out=out, mask=None)
    assert len(kernel.jit_calls) == 1 and not kernel.direct_calls
    assert kernel.jit_calls[0] == ((5, 1, 1), {"x": x, "out": out, "mask": None, **FIXED})
    y = torch.ones(8)
    launch(x=y, out=out, mask=None)
    assert len(kernel.jit_calls) == 1
    grid, args = kernel.direct_calls[0]
    assert grid == (5, 1, 1)
    assert args == (y, out, None, 10, 3, 16)  # the kernel's order; launch options are not arguments


@settings(max_examples=30, deadline=None)
@given(offsets=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=8))
def test_each_alignment_is_compiled_through_the_jit_once(offsets):
    """Triton specialises pointers on 16-byte alignment: a call whose tensors align differently
    from every earlier call goes through the JIT (which picks the kernel for it), never straight
    to a kernel compiled for another alignment."""
    kernel = RecordingKernel()
    launch = FixedLaunch(kernel, (2, 3), FIXED)
    storage = torch.zeros(64)
    seen = set()
    for x_offset, out_offset in offsets:
        x, out = storage[x_offset:x_offset + 8], storage[out_offset:out_offset + 8]
        key = (x.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0)  # one dtype throughout
        jit_before = len(kernel.jit_calls)
        launch(x=x, out=out, mask=None)
        assert len(kernel.jit_calls) == jit_before + (key not in seen)
        seen.add(key)
    assert len(kernel.jit_calls) + len(kernel.direct_calls) == len(offsets)


def test_a_tensor_where_an_earlier_call_passed_none_goes_through_the_jit():
    kernel = RecordingKernel()
    launch = FixedLaunch(kernel, (1,), FIXED)
    x, out = torch.zeros(8), torch.zeros(8)
    launch(x=x, out=out, mask=None)
    launch(x=x, out=out, mask=torch.zeros(8, dtype=torch.bool))
    launch(x=x, out=out, mask=torch.zeros(8, dtype=torch.bool))
    assert len(kernel.jit_calls) == 2 and len(kernel.direct_calls) == 1


def test_another_dtype_goes_through_the_jit():
    kernel = RecordingKernel()
    launch = FixedLaunch(kernel, (1,), FIXED)
    out = torch.zeros(8)
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        launch(x=torch.zeros(8, dtype=dtype), out=out, mask=None)
    assert len(kernel.jit_calls) == 2 and len(kernel.direct_calls) == 2


def test_a_jit_that_returns_no_compiled_kernel_is_always_called():
    kernel = RecordingKernel(returns_compiled=False)
    launch = FixedLaunch(kernel, (1,), FIXED)
    for _ in range(3):
        launch(x=torch.zeros(4), out=torch.zeros(4), mask=None)
    assert len(kernel.jit_calls) == 3 and not kernel.direct_calls
