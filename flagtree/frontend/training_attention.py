"""SDPA calls that need gradients become `flagtree::attention` before aot_autograd traces them.

aot_autograd would decompose F.scaled_dot_product_attention with torch's choice of fused
kernel: a forward that returns that kernel's own logsumexp layout and RNG state, and a
backward op only that kernel can run.  `flagtree::attention` is a custom op with an autograd
formula in flagtree's terms instead: its forward returns (out, lse) as `ft.attention` with
`with_lse` defines them, and its backward is `flagtree::attention_backward`, which is
`ft.attention_grad`.  aot_autograd keeps both whole, so the forward graph imports as one
`ft.attention` and the backward graph as one `ft.attention_grad`, and each backend runs its
own kernels on both sides.

Only calls the ops express are rewritten (no dropout, a mask that needs no gradient, q, k and
v of rank 4 with whole GQA groups); the rest keep torch's kernels, which the importer counts
as fallbacks.  Inference graphs are left alone: there the importer maps the fused aten op.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from flagtree.ir.ops.attention import attention_grad_reference, attention_reference

# F.scaled_dot_product_attention's parameters, in positional order.
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _attrs(q: torch.Tensor, mask: torch.Tensor | None, scale: float | None, causal: str, window: int,
           sinks: torch.Tensor | None) -> dict[str, object]:
    """ft.attention's attributes for one call (SDPA's default scale is 1/sqrt(Dqk))."""
    return {"scale": q.shape[-1] ** -0.5 if scale is None else scale, "causal": causal, "window": window,
            "has_mask": mask is not None, "has_sinks": sinks is not None}


def _optional(mask: torch.Tensor | None, sinks: torch.Tensor | None) -> list[torch.Tensor]:
    """The mask as ft.attention takes it (rank 4, leading dims of 1: SDPA broadcasts from the
    right) and the sinks, those present."""
    masks = [] if mask is None else [mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))]
    return masks + ([] if sinks is None else [sinks])


@torch.library.custom_op("flagtree::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
              causal: str, window: int = 0, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ft.attention with `with_lse`: (out, lse)."""
    attrs = {**_attrs(q, mask, scale, causal, window, sinks), "with_lse": True}
    return attention_reference([q, k, v, *_optional(mask, sinks)], attrs, [])


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal, window=0, sinks=None):
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    return out, q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("flagtree::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, mask: torch.Tensor | None, scale: float | None, causal: str,
                       window: int = 0, sinks: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ft.attention_grad: (grad_q, grad_k, grad_v, grad_sinks); grad_sinks is empty without sinks
    (a custom op returns tensors, not None)."""
    grads = attention_grad_reference([q, k, v, out, grad_out, lse, *_optional(mask, sinks)],
                                     _attrs(q, mask, scale, causal, window, sinks), [])
    return grads if sinks is not None else (*grads, q.new_empty(0))


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, scale, causal, window=0, sinks=None):
    grad_sinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_sinks


def _save_for_backward(ctx, inputs, output) -> None:
    q, k, v, mask, scale, causal, window, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse, sinks)
    ctx.scale, ctx.causal, ctx.window = scale, causal, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse, sinks = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_sinks = attention_backward(grad_out.contiguous(), q, k, v, out, lse, mask, ctx.scale,
                                                            ctx.causal, ctx.window, sinks)
    return grad_q, grad_k, grad_v, None, None, None, None, grad_sinks if sinks is not None else None


attention.register_autograd(_backward, setup_context=_save_for_backward)


def route_training_attention(gm: fx.GraphModule) -> int:
    """In Dynamo's graph `gm`, replace each SDPA call that needs gradients and that
    flagtree::attention expresses with it; returns how many were replaced."""
    if not torch.is_grad_enabled():
        return 0
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            arguments = _sdpa_arguments(node)
            if _needs_gradients(arguments) and _expressible(arguments):
                _replace(gm.graph, node, arguments)
                replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _sdpa_arguments(node: fx.Node) -> dict[str, object]:
    arguments = dict(_SDPA_DEFAULTS)
    arguments.update(zip(_SDPA_PARAMETERS, node.args))
    arguments.update(node.kwargs)
    return arguments


def _example(arg: object) -> torch.Tensor | None:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _needs_gradients(arguments: dict[str, object]) -> bool:
    return any(t is not None and t.requires_grad for t in map(_example, (arguments[n] for n in _SDPA_PARAMETERS[:3])))


def _expressible(arguments: dict[str, object]) -> bool:
    """Whether flagtree::attention computes exactly what this SDPA call does."""
    q, k, v = (_example(arguments[n]) for n in _SDPA_PARAMETERS[:3])
    mask = arguments["attn_mask"]
    if any(t is None or t.dim() != 4 for t in (q, k, v)) or arguments["dropout_p"] != 0.0:
        return False
    if mask is not None and (_example(mask) is None or _example(mask).requires_grad or arguments["is_causal"]):
        return False  # is_causal with a mask is an error SDPA itself reports
    if isinstance(arguments["scale"], fx.Node) or not isinstance(arguments["is_causal"], bool):
        return False
    same_heads = q.shape[1] == k.shape[1] == v.shape[1]
    grouped = arguments["enable_gqa"] is True and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
    batches_match = q.shape[0] == k.shape[0] == v.shape[0]
    return bool(batches_match and (same_heads or grouped))


def _replace(graph: fx.Graph, node: fx.Node, arguments: dict[str, object]) -> None:
    causal = "upper_left" if arguments["is_causal"] else "none"  # SDPA aligns is_causal to the top left
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.flagtree.attention.default,
                                   (arguments["query"], arguments["key"], arguments["value"], arguments["attn_mask"],
                                    arguments["scale"], causal))
        out = graph.call_function(operator.getitem, (call, 0))
    for new in (call, out):
        new.meta["stack_trace"] = node.meta.get("stack_trace")
    node.replace_all_uses_with(out)
    graph.erase_node(node)
