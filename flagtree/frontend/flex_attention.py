"""flex_attention as the math it stands for, so that its attention can fuse.

Dynamo keeps `flex_attention(q, k, v, score_mod, block_mask, ...)` as one higher-order op whose
score_mod and mask_mod are subgraphs, which FTIR cannot hold (left so, the graph would run in
eager torch: graph_compiler's EagerGraph).  `route_flex_attention` points that node at torch's
own eager implementation of the op, `math_attention`: q·kᵀ·scale, then score_mod and mask_mod
applied through vmap, a safe softmax (rows that see no key give 0) and p·v.  aot_autograd
traces the mods into ordinary ops, and fuse-attention turns the result into `ft.attention`
where it can prove what they do (a causal or sliding-window mask, as for any explicit
spelling); other mods (a bias, soft-capping) run as the unfused math, correct.  The outputs
are the op's own (out, logsumexp, max scores), so the graph around it is unchanged; a
training graph differentiates the math, unfused (on the CPU torch's flex_attention refuses
inputs that need a gradient before any compiler sees the call).

Both the op and `math_attention` are torch internals: where either is missing, nothing is
rewritten and the graph runs in eager torch, counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def route_flex_attention(gm: fx.GraphModule) -> bool:
    """Rewrite `gm`'s flex_attention calls to its math form in place; whether any was."""
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is None or _math_attention() is None:
        return False
    nodes = [node for node in gm.graph.nodes if node.op == "call_function" and node.target is flex]
    for node in nodes:
        node.target = flex_attention_math
    if nodes:
        gm.recompile()
    return bool(nodes)


def flex_attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Any,
                        block_mask: tuple, scale: float, kernel_options: dict[str, Any],
                        score_mod_other_buffers: tuple = (), mask_mod_other_buffers: tuple = ()) -> tuple:
    """flex_attention's (out, logsumexp, max scores), by torch's math implementation of it."""
    return _math_attention()(query, key, value, score_mod, block_mask, scale, kernel_options, score_mod_other_buffers,
                             mask_mod_other_buffers)


def _math_attention() -> Any:
    try:
        from torch._higher_order_ops.flex_attention import math_attention
    except ImportError:
        return None
    return math_attention
