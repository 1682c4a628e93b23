"""Freezing: bake a Dynamo graph's nn.Parameter inputs into the graph as constants.

Dynamo passes parameters as graph inputs. With `freeze=True` (inference only) they become
buffers of a copy of the graph module, read with `get_attr`; aot_autograd lifts buffers to
the leading inputs of its graph, where the importer turns them into `ft.constant`
ResourceAttrs whose data is in `Module.resources`. The compiled callable no longer takes
them. As with Inductor's freezing, the tensors are captured at compile time: changing a
parameter afterwards is not guaranteed to be seen (passes may fold it into other constants).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx


@dataclass(frozen=True)
class FrozenParameters:
    """Which buffers of the frozen graph hold parameters, and which inputs remain."""

    resource_names: dict[str, str]  # buffer name → resource name in the FTIR module
    kept_inputs: list[int]  # positions of the Dynamo inputs the frozen graph still takes

    def constants(self, gm: fx.GraphModule) -> dict[int, tuple[str, torch.Tensor]]:
        """aot_autograd's lifted inputs that are frozen parameters: position → (resource name, tensor).

        aot_autograd puts the module's parameters, then its buffers, before the graph's own
        inputs (aot_module_simplified), so the positions follow that order."""
        lifted = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
        return {
            position: (self.resource_names[name], tensor)
            for position, (name, tensor) in enumerate(lifted.items())
            if name in self.resource_names
        }

    def drop_frozen_arguments(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """A callable with Dynamo's original signature that passes only the kept inputs on."""
        kept = self.kept_inputs

        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in kept])

        return run


def freeze_parameters(
    gm: fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[fx.GraphModule, list[Any], FrozenParameters]:
    """A copy of `gm` whose Parameter inputs are buffers, its remaining example inputs, and
    the bookkeeping to call it. `gm` itself is left alone: Dynamo reads its placeholders to
    decide what to pass the compiled graph."""
    frozen_gm, placeholders = _copy(gm)
    resource_names: dict[str, str] = {}
    kept: list[int] = []
    for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(example, torch.nn.Parameter):
            kept.append(index)
            continue
        buffer = f"_frozen_param_{index}"
        frozen_gm.register_buffer(buffer, example.detach())
        resource_names[buffer] = _unique(_resource_name(node), resource_names.values())
        if hasattr(frozen_gm, "_param_name_to_source"):
            # aot_autograd checks every lifted buffer against Dynamo's sources.
            frozen_gm._param_name_to_source[buffer] = node._dynamo_source
        with frozen_gm.graph.inserting_before(node):
            node.replace_all_uses_with(frozen_gm.graph.get_attr(buffer))
        frozen_gm.graph.erase_node(node)
    frozen_gm.recompile()
    return frozen_gm, [example_inputs[i] for i in kept], FrozenParameters(resource_names, kept)


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A new GraphModule over a copy of `gm`'s graph, keeping Dynamo's metadata."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, new in copies.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    frozen = fx.GraphModule(gm, graph)
    frozen.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        frozen._param_name_to_source = dict(gm._param_name_to_source)
    return frozen, [copies[n] for n in gm.graph.find_nodes(op="placeholder")]


def _resource_name(node: fx.Node) -> str:
    """`fc1.weight` from Dynamo's source `L['self']._modules['fc1']._parameters['weight']`."""
    source = getattr(node, "_dynamo_source", None)
    keys = re.findall(r"\['([^']+)'\]", source.name if source is not None else "")
    if keys[:1] == ["self"]:
        keys = keys[1:]
    name = re.sub(r"[^A-Za-z0-9_.]", "_", ".".join(keys) or node.name)
    # Kept a bare identifier so it prints unquoted: `_0.weight`, not `"0.weight"` (a Sequential's child).
    return name if re.match(r"[A-Za-z_]", name) else "_" + name


def _unique(name: str, taken: Any) -> str:
    taken = set(taken)
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate
