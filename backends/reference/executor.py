"""Interpret FTIR with each op's reference implementation (see flagtree/ir/opdef.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from flagtree.errors import FlagtreeError
from flagtree.ir.attributes import ResourceAttr
from flagtree.ir.core import Block, Module, Operation
from flagtree.ir.opdef import lookup


class ExecutionError(FlagtreeError):
    """An op failed at run time; the message names the op and its location."""


def _run_op(op: Operation, values: list[Any], resources: dict[str, torch.Tensor]) -> list[Any]:
    if op.name == "ft.fusion":
        return run_block(op.regions[0].block, values, resources)
    if op.name == "ft.constant" and isinstance(op.attributes["value"], ResourceAttr):
        name = op.attributes["value"].name
        if name not in resources:
            raise ExecutionError(f"{op.location}: 'ft.constant' op: resource '{name}' has no data bound")
        return [resources[name]]
    opdef = lookup(op.name)
    if opdef is None or opdef.reference is None:
        raise ExecutionError(f"{op.location}: '{op.name}' op has no reference implementation")
    out = opdef.reference(values, op.attributes, [r.type for r in op.results])
    return list(out) if isinstance(out, tuple) else [out]


def run_block(block: Block, args: Sequence[Any], resources: dict[str, torch.Tensor]) -> list[Any]:
    """Run a block on `args`; returns the operands of its terminator.

    Ops that read no tensor (constants, ft.iota, ft.full) build on the CPU; their results move
    to the device of the block's first tensor argument, so they combine with the graph's tensors.
    """
    env: dict[int, Any] = {id(a): v for a, v in zip(block.args, args)}
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    for op in block.ops:
        operands = [env[id(v)] for v in op.operands]
        if op.name in ("func.return", "ft.yield"):
            return operands
        try:
            outputs = _run_op(op, operands, resources)
        except ExecutionError:
            raise
        except Exception as e:
            raise ExecutionError(f"{op.location}: '{op.name}' op failed: {type(e).__name__}: {e}") from e
        if device is not None and not any(isinstance(v, torch.Tensor) for v in operands):
            outputs = [v.to(device) if isinstance(v, torch.Tensor) else v for v in outputs]
        for result, value in zip(op.results, outputs):
            env[id(result)] = value
    raise ExecutionError("block has no terminator")


def run_module(module: Module, args: Sequence[Any], function: str = "main") -> list[Any]:
    """Run `@function` of `module` on `args` (tensors and ints) with eager torch."""
    block = module.function(function).regions[0].block
    if len(args) != len(block.args):
        raise ExecutionError(f"@{function} takes {len(block.args)} arguments, got {len(args)}")
    return run_block(block, args, module.resources)


class ReferenceExecutable:
    """A compiled graph on the reference backend: the module, run op by op."""

    backend = "reference"

    def __init__(self, module: Module, function: str = "main"):
        self.module = module
        self.function = function
        self.fallback_ops = Counter(
            op.attributes["target"] for op in module.walk() if op.name == "ft.torch_call"
        )

    def __call__(self, *args: Any) -> list[Any]:
        return run_module(self.module, args, self.function)
