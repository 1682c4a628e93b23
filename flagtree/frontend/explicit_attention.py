"""Explicit attention (matmul · softmax · matmul spellings) in training graphs becomes
`flagtree::attention` before aot_autograd, so its backward is `ft.attention_grad`.

fuse-attention runs on FTIR, after aot_autograd has split training into a forward graph and a
backward graph; there the probabilities are saved for the backward and nothing can fuse.  So
for a graph that needs gradients this module asks fuse-attention first, on the forward alone:

1. the Dynamo graph is traced to an aten graph (make_fx, torch's decompositions) and
   imported into FTIR, remembering which FX node each value came from;
2. `canonicalize,cse,fuse-attention` runs on it;
3. each FX node whose value the pass replaced by a value built from an `ft.attention` (through
   the view and cast ops the pass puts around it) is rewired to the same computation spelled
   in FX: `flagtree::attention` on the nodes q, k, v (and mask) came from;
4. aot_autograd gets that aten graph instead of Dynamo's; the dead matmul and softmax nodes
   are gone, and flagtree::attention's autograd formula supplies the backward.

The trace runs on Dynamo's own fake inputs, so a graph compiled for symbolic sizes (dynamic=True,
or a recompile after a size changed) keeps them: a dynamic size the pass computed (ft.dim and
i64 arithmetic) is spelled back as sym_size and Python arithmetic on the graph's nodes.
Only what maps back exactly is rewired: operands built from FX nodes by reshape, transpose,
broadcast, concat and cast.  Anything else keeps the graph as it was (the training graph stays
unfused, which `flagtree-opt --explain` on its dump explains), and a failure to trace is
logged, not raised.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

from flagtree.frontend.importer import import_graph
from flagtree.ir.core import Module, Operation, OpResult, Value
from flagtree.ir.types import I64, TensorType
from flagtree.passes import PassManager

logger = logging.getLogger("flagtree")

PIPELINE = "canonicalize,cse,fuse-attention"
_SOFTMAX_TARGETS = (torch.softmax, F.softmax, torch.Tensor.softmax, "softmax")


def route_explicit_attention(gm: fx.GraphModule, example_inputs: Sequence[Any],
                             decompositions: dict[Any, Callable[..., Any]]) -> fx.GraphModule | None:
    """An aten graph computing `gm` with its explicit attentions as flagtree::attention, or None
    when `gm` does not train, has none, or they cannot be rewired (see the module doc)."""
    if not _trains(example_inputs) or not any(_is_softmax(node) for node in gm.graph.nodes):
        return None
    try:
        aten = _trace(gm, decompositions)
        rewired = _Rewiring(aten).run()
    except Exception as e:  # the graph then trains unfused, as it would without this step
        logger.warning("flagtree: explicit attention in this training graph stays unfused: %s: %s",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return aten if rewired else None


def _trace(gm: fx.GraphModule, decompositions: dict[Any, Callable[..., Any]]) -> fx.GraphModule:
    """`gm` as an aten graph, traced on the fake values Dynamo recorded for its inputs (static or
    symbolic sizes exactly as Dynamo compiled them; sizes it passes as arguments stay arguments)."""
    fakes = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
    fake_mode = next(v.fake_mode for v in fakes if isinstance(v, FakeTensor))
    with fake_mode:
        return make_fx(gm, decomposition_table=decompositions, tracing_mode="real")(*fakes)


def _trains(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)


def _is_softmax(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _SOFTMAX_TARGETS


class _Rewiring:
    """Steps 2 and 3 of the module doc on one aten graph (edited in place)."""

    def __init__(self, aten: fx.GraphModule):
        self.aten = aten
        imported = import_graph(aten)
        self.module: Module = imported.module
        self.origin = {id(v): node for node, v in imported.node_values.items() if isinstance(v, Value)}
        self.values = {id(v): v for v in imported.node_values.values() if isinstance(v, Value)}
        # Each imported value's users now, so the value replacing it can be found after the pass.
        self.users = {key: list(v.uses) for key, v in self.values.items()}
        self.built: dict[int, fx.Node] = {}

    def run(self) -> int:
        PassManager(PIPELINE).run(self.module)
        if not any(op.name == "ft.attention" for op in self.module.walk()):
            return 0
        rewired = 0
        for key, node in list(self.origin.items()):
            replacement = self._replacement(self.values[key])
            if replacement is None or not _through_attention(replacement):
                continue
            try:
                with self.aten.graph.inserting_before(node):
                    new = self._fx(replacement, node)
            except _Unmappable as e:
                logger.info("flagtree: an explicit attention stays unfused in training: %s", e)
                continue
            node.replace_all_uses_with(new)
            rewired += 1
        if rewired:
            self.aten.graph.eliminate_dead_code()
            self.aten.recompile()
        return rewired

    def _replacement(self, value: Value) -> Value | None:
        """The value that took `value`'s place in its users, when the pipeline erased its op."""
        if not isinstance(value, OpResult) or value.op.parent is not None:
            return None
        for user, index in self.users[id(value)]:
            if user.parent is not None and index < len(user.operands):
                return user.operands[index]
        return None

    def _fx(self, value: Value, anchor: fx.Node) -> fx.Node | int:
        """`value` as an FX node of the aten graph (built before `anchor`); a constant size as an int."""
        if id(value) in self.origin and self.origin[id(value)] is not anchor:
            return self.origin[id(value)]
        if id(value) in self.built:
            return self.built[id(value)]
        if not isinstance(value, OpResult):
            raise _Unmappable(f"an argument of type {value.type} has no FX node")
        op = value.op
        sizes = _SIZE_BUILDERS if value.type == I64 else {}
        build = (_TENSOR_BUILDERS if isinstance(value.type, TensorType) else sizes).get(op.name)
        if build is None:
            raise _Unmappable(f"{op.name} at {op.location} has no FX spelling here")
        node = build(self.aten.graph, op, [self._fx(v, anchor) for v in op.operands], value)
        self.built[id(value)] = node
        return node


class _Unmappable(Exception):
    """A value fuse-attention built that this module cannot spell back in FX (the message)."""


def _through_attention(value: Value) -> bool:
    """Whether `value` is an ft.attention result, through the view and cast ops around it."""
    while isinstance(value, OpResult) and value.op.name in _VIEWS_AND_CASTS:
        value = value.op.operands[0]
    return isinstance(value, OpResult) and value.op.name == "ft.attention"


def _attention(graph: fx.Graph, op: Operation, operands: list[fx.Node], value: Value) -> fx.Node:
    attrs = op.attributes
    mask = operands[3] if attrs["has_mask"] else None
    sinks = operands[-1] if attrs["has_sinks"] else None
    call = graph.call_function(torch.ops.flagtree.attention.default,
                               (*operands[:3], mask, attrs["scale"], attrs["causal"], attrs["window"], sinks))
    return graph.call_function(operator.getitem, (call, 0))


def _sizes(value: Value, operands: list[fx.Node | int]) -> list[fx.Node | int]:
    """A sized op's result shape for aten: its static dims, and one size operand per `?` dim."""
    dynamic = iter(operands[1:])
    return [next(dynamic) if size is None else size for size in value.type.shape]


Builder = Callable[[fx.Graph, Operation, list[Any], Value], Any]
_TENSOR_BUILDERS: dict[str, Builder] = {
    "ft.attention": _attention,
    "ft.reshape": lambda g, op, xs, v: g.call_function(torch.ops.aten.reshape.default, (xs[0], _sizes(v, xs))),
    "ft.broadcast_to": lambda g, op, xs, v: g.call_function(torch.ops.aten.expand.default, (xs[0], _sizes(v, xs))),
    "ft.transpose": lambda g, op, xs, v: g.call_function(torch.ops.aten.permute.default,
                                                         (xs[0], list(op.attributes["perm"]))),
    "ft.concat": lambda g, op, xs, v: g.call_function(torch.ops.aten.cat.default, (xs, op.attributes["dim"])),
    "ft.cast": lambda g, op, xs, v: g.call_function(torch.ops.prims.convert_element_type.default,
                                                    (xs[0], v.type.dtype.torch_dtype)),
}
_VIEWS_AND_CASTS = frozenset(_TENSOR_BUILDERS) - {"ft.attention"}


def _size_arithmetic(function: Callable[[Any, Any], Any]) -> Builder:
    return lambda g, op, xs, v: g.call_function(function, tuple(xs))


# The i64 size ops symbolic sizes are built from (flagtree/frontend/symbolic.py), in FX.
_SIZE_BUILDERS: dict[str, Builder] = {
    "ft.constant": lambda g, op, xs, v: int(op.attributes["value"]),
    "ft.dim": lambda g, op, xs, v: g.call_function(torch.ops.aten.sym_size.int, (xs[0], op.attributes["dim"])),
    "ft.add": _size_arithmetic(operator.add),
    "ft.sub": _size_arithmetic(operator.sub),
    "ft.mul": _size_arithmetic(operator.mul),
    "ft.floordiv": _size_arithmetic(operator.floordiv),
    "ft.remainder": _size_arithmetic(operator.mod),
    "ft.maximum": _size_arithmetic(torch.sym_max),
    "ft.minimum": _size_arithmetic(torch.sym_min),
}
