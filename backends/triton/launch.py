"""Write a generated kernel's launch into a plan, from the kernel's `LAUNCH` description.

`LAUNCH` (see codegen.py) is written in terms of the fusion op's operands, so a cached
kernel is launched from any graph that contains the same region:

    sizes:          size templates ("{0}.shape[1]"); kernel argument size<i> is template i
    tensor_inputs:  operands whose strides follow the sizes (`*arg0.stride()`)
    outputs:        shape (ints and size names) and torch dtype of each output buffer
    grid:           programs = cdiv(product(count), constexprs[per_program])
    numel:          the iteration shape, for the 32/64-bit index decision
    equal_sizes:    pairs of sizes (ints and templates) the kernel takes to be equal (run-time
                    sizes that broadcast or line up); the plan checks them before launching
    constexprs, num_warps, do_not_specialize
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flagtree.errors import FlagtreeError
from flagtree.runtime.plan import PlanWriter

_INT32_LIMIT = 2**31


def needs_int64(numel: int, *tensors: torch.Tensor) -> bool:
    """Whether a kernel over `numel` elements reading/writing `tensors` needs 64-bit offsets
    (the launch passes it as the INDEX_64 constexpr, so small launches keep 32-bit math)."""
    if numel >= _INT32_LIMIT:
        return True
    for t in tensors:
        extent = t.storage_offset() + 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)
        if extent >= _INT32_LIMIT:
            return True
    return False


def check_equal_sizes(kernel: str, *pairs: tuple[int, int]) -> None:
    """Raise if the inputs disagree on sizes the kernel takes to be equal."""
    for a, b in pairs:
        if a != b:
            raise FlagtreeError(f"kernel {kernel}: its inputs have sizes {a} and {b} where the graph needs equal "
                                "sizes (eager torch would reject these shapes as well)")


def write_launch(launch: dict[str, Any], kernel: str, writer: PlanWriter, operands: list[str]) -> list[str]:
    """Plan lines allocating the outputs and launching `kernel`; returns the outputs' names."""
    import triton

    writer.bind("triton", triton)
    writer.bind("needs_int64", needs_int64)
    sizes = {f"size{i}": writer.size(template.format(*operands)) for i, template in enumerate(launch["sizes"])}

    def dims(shape: list[int | str]) -> list[str]:
        return [str(d) if isinstance(d, int) else sizes[d] for d in shape]

    outputs = []
    for out in launch["outputs"]:
        name = writer.new_buffer()
        writer.line(f"{name} = torch.empty({_tuple(dims(out['shape']))}, dtype={out['dtype']}, device=device)")
        outputs.append(name)
    if launch["equal_sizes"]:
        writer.bind("check_equal_sizes", check_equal_sizes)
        pairs = ", ".join(f"({_plan_size(x, writer, operands)}, {_plan_size(y, writer, operands)})"
                          for x, y in launch["equal_sizes"])
        writer.line(f"check_equal_sizes({kernel!r}, {pairs})")
    tensors = [operands[k] for k in launch["tensor_inputs"]] + outputs
    arguments = [*operands, *outputs, *sizes.values(), *(f"*{operands[k]}.stride()" for k in launch["tensor_inputs"])]
    grid = launch["grid"]
    programs = _cdiv(dims(grid["count"]), launch["constexprs"][grid["per_program"]])
    constexprs = [f"{k}={v}" for k, v in launch["constexprs"].items()]
    writer.line(f"{kernel}[({programs},)]({', '.join(arguments)}, "
                f"INDEX_64=needs_int64({_product(dims(launch['numel']))}, {', '.join(tensors)}), "
                f"{', '.join(constexprs)}, num_warps={launch['num_warps']})")
    return outputs


def _plan_size(d: int | str, writer: PlanWriter, operands: list[str]) -> str:
    """A static size, or the plan local holding a size template's value."""
    return str(d) if isinstance(d, int) else writer.size(d.format(*operands))


def _product(dims: list[str]) -> str:
    static = math.prod(int(d) for d in dims if d.isdigit())
    names = [d for d in dims if not d.isdigit()]
    return " * ".join(([str(static)] if static != 1 or not names else []) + names)


def _cdiv(dims: list[str], per_program: int) -> str:
    count = _product(dims)
    if count.isdigit():
        return str(-(-int(count) // per_program))
    return f"triton.cdiv({count}, {per_program})"


def _tuple(dims: list[str]) -> str:
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
