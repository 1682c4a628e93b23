"""`F.scaled_dot_product_attention` calls on rank-3 tensors become rank 4 before aot_autograd traces them.

SDPA's fused kernels take [B, H, S, D] tensors and a mask of rank 2 or 4; on [H, S, D]
tensors, or with an [H, Sq, Skv] mask, SDPA runs its math form, which aot_autograd
decomposes into matmuls and a softmax. A leading dim of 1 keeps the call on a fused kernel,
which the importer maps to one `ft.attention`. Semantics are unchanged: SDPA broadcasts the
mask against the scores from the right, and GQA's heads stay dim -3.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

# F.scaled_dot_product_attention's tensor arguments, in positional order.
_TENSOR_ARGS = ("query", "key", "value", "attn_mask")


def lift_attention_to_rank4(gm: fx.GraphModule) -> None:
    """In Dynamo's graph `gm`, unsqueeze(0) the rank-3 tensors of each SDPA call (squeeze(0) its
    result when the query was lifted)."""
    liftable = [n for n in gm.graph.nodes if _is_sdpa(n) and _rank3_args(n)]
    for node in liftable:
        _lift(gm.graph, node)
    if liftable:
        gm.recompile()


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _argument(node: fx.Node, index: int) -> object:
    """SDPA's tensor argument `index`, passed by position or by name (None when absent)."""
    return node.args[index] if index < len(node.args) else node.kwargs.get(_TENSOR_ARGS[index])


def _rank(arg: object) -> int | None:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _rank3_args(node: fx.Node) -> set[fx.Node]:
    """The call's rank-3 tensor arguments to lift: q, k and v when all three are rank 3, and a
    rank-3 mask, provided q, k and v end up rank 4."""
    qkv_ranks = {_rank(_argument(node, i)) for i in range(3)}
    if qkv_ranks not in ({3}, {4}):
        return set()
    return {arg for arg in (_argument(node, i) for i in range(4)) if _rank(arg) == 3}


def _lift(graph: fx.Graph, node: fx.Node) -> None:
    query = _argument(node, 0)
    with graph.inserting_before(node):
        lifted = {arg: graph.call_function(torch.unsqueeze, (arg, 0)) for arg in _rank3_args(node)}
    for arg, new in lifted.items():  # later graph passes read ranks from the example values
        new.meta["example_value"] = arg.meta["example_value"].unsqueeze(0)
    node.args = tuple(lifted.get(a, a) if i < len(_TENSOR_ARGS) else a for i, a in enumerate(node.args))
    node.kwargs = {k: lifted.get(a, a) if k in _TENSOR_ARGS else a for k, a in node.kwargs.items()}
    new_nodes = list(lifted.values())
    if query in lifted:
        with graph.inserting_after(node):
            squeezed = graph.call_function(torch.squeeze, (node, 0))
        node.replace_all_uses_with(squeezed, delete_user_cb=lambda user: user is not squeezed)
        new_nodes.append(squeezed)
    for new in new_nodes:
        new.meta["stack_trace"] = node.meta.get("stack_trace")
