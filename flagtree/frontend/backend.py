"""The torch.compile backend: `torch.compile(model, backend="flagtree", options={...})`.

Registered through the `torch_dynamo_backends` entry point (setup.py), so it works without
importing flagtree first. Dynamo hands over a torch-level FX graph (the rank-3 tensors of its
SDPA calls are lifted to rank 4 first: attention_rank.py; flex_attention becomes its math:
flex_attention.py); aot_autograd functionalizes it and decomposes it with torch's own tables
into aten graphs (one for inference, or a forward and a backward when training), and each
aten graph is compiled by `graph_compiler.compile_aten_graph`.

Dynamic shapes: with `dynamic=True` the graphs carry symbolic sizes, which FTIR keeps as
`?` dims; flagtree adds no guards of its own, so Dynamo's guards alone decide recompiles.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions, get_decompositions
from torch._dynamo.backends.common import aot_autograd

from flagtree.errors import OptionsError
from flagtree.frontend.aten_mapping import EXTRA_DECOMPOSITIONS, KEPT_FROM_DECOMPOSITION, OWN_DECOMPOSITIONS
from flagtree.frontend.attention_rank import lift_attention_to_rank4
from flagtree.frontend.explicit_attention import route_explicit_attention
from flagtree.frontend.flex_attention import route_flex_attention
from flagtree.frontend.freezing import FrozenParameters, freeze_parameters
from flagtree.frontend.graph_compiler import compile_aten_graph
from flagtree.frontend.options import REDUCE_OVERHEAD, CompileOptions, check_mode
from flagtree.frontend.reduce_overhead import cuda_graph_request
from flagtree.frontend.training_attention import route_training_attention

_graph_ids = itertools.count()


def flagtree_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | CompileOptions | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Compile a Dynamo graph; `options` are CompileOptions fields (see flagtree.frontend.options)."""
    check_mode(mode)
    options = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    graph_id = next(_graph_ids)
    frozen: FrozenParameters | None = None
    if options.freeze:
        if torch.is_grad_enabled():
            raise OptionsError(
                "option 'freeze' is for inference: call the compiled model under torch.no_grad() or "
                "torch.inference_mode(), or drop freeze=True to train"
            )
        gm, example_inputs, frozen = freeze_parameters(gm, example_inputs)
    lift_attention_to_rank4(gm)
    route_flex_attention(gm)
    route_training_attention(gm)
    gm = route_explicit_attention(gm, example_inputs, decomposition_table()) or gm

    def compiler(kind: str) -> Callable[[fx.GraphModule, Sequence[Any]], Any]:
        def compile_graph(aten_gm: fx.GraphModule, aten_inputs: Sequence[Any]) -> Any:
            constants = frozen.constants(gm) if frozen is not None and kind == "inference" else None
            cuda_graphs = cuda_graph_request(kind) if mode == REDUCE_OVERHEAD else None
            return compile_aten_graph(aten_gm, aten_inputs, f"graph_{graph_id}_{kind}", options, constants, cuda_graphs)

        return compile_graph

    compiled = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        decompositions=decomposition_table(),
    )(gm, list(example_inputs))
    return frozen.drop_frozen_arguments(compiled) if frozen is not None else compiled


@functools.cache
def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """torch's core ATen decompositions, plus torch's own decompositions of the core ops
    FTIR has no op for (EXTRA_DECOMPOSITIONS says why for each) and flagtree's of fused ops
    torch does not decompose (OWN_DECOMPOSITIONS), less the ops the importer maps whole
    (KEPT_FROM_DECOMPOSITION)."""
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([_overload(name) for name in EXTRA_DECOMPOSITIONS]))
    table.update({_overload(name): decomposition for name, (_, decomposition) in OWN_DECOMPOSITIONS.items()})
    for name in KEPT_FROM_DECOMPOSITION:
        del table[_overload(name)]
    return table


def _overload(name: str) -> torch._ops.OpOverload:
    """`aten.native_layer_norm.default` → torch.ops.aten.native_layer_norm.default."""
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)
