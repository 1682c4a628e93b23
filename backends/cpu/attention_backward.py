"""`ft.attention_grad` on the cpu backend: torch's CPU flash-attention backward, a library call
(as matmuls are BLAS calls), where it computes the op exactly.

torch's `_scaled_dot_product_flash_attention_for_cpu_backward` takes the forward's log-sum-exp
in ft.attention's convention (natural log, [B, H, Sq], a row that sees nothing at +inf gets
zero gradients), a causal flag aligned to the top left, and an additive or boolean mask.  It
needs equal qk and v head dims and equal head counts (GQA: K and V are repeated to the query
heads and their gradients summed back over each group).  What it lacks is added around it:
a window or a lower-right diagonal with Sq ≠ Skv becomes part of an additive mask, and sinks
need nothing (the lse holds them, so p = exp(s − lse) is right) but their own gradient,
−Σ exp(sink − lse)·D.  Unequal head dims raise UnsupportedRegion: the op then runs its
reference, counted.
"""

from __future__ import annotations

import torch

from flagtree.backends.lowering import UnsupportedRegion
from flagtree.ir.core import Operation
from flagtree.ir.ops.attention import sink_gradient, visible_keys
from flagtree.ir.types import TensorType
from flagtree.runtime.plan import PlanWriter

_DTYPES = frozenset({"f64", "f32", "f16", "bf16"})


def unsupported_reason(op: Operation) -> str | None:
    """Why torch's CPU flash-attention backward cannot compute `op`, or None."""
    q, k, v = (o.type for o in op.operands[:3])
    if not all(isinstance(t, TensorType) for t in (q, k, v)) or q.dtype.name not in _DTYPES:
        return f"torch's CPU flash-attention backward takes f64, f32, f16 or bf16, not {q.dtype}"
    if q.shape[3] is None or q.shape[3] != v.shape[3]:
        return f"torch's CPU flash-attention backward needs equal static qk and v head dims, not " \
               f"{q.shape[3]}/{v.shape[3]}"
    return None


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None = None,
                             sinks: torch.Tensor | None = None, *, scale: float, causal: str,
                             window: int) -> tuple[torch.Tensor, ...]:
    """(grad_q, grad_k, grad_v), plus grad_sinks with `sinks`, of ft.attention through torch's CPU kernel."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    top_left = causal == "upper_left" or (causal == "lower_right" and q.shape[2] == k.shape[2])
    if window or (causal != "none" and not top_left):  # what torch's causal flag cannot say, as a mask
        visible = visible_keys(q.shape[2], k.shape[2], causal, window)
        hidden = torch.zeros(visible.shape, dtype=q.dtype if mask is None else mask.dtype)
        hidden = hidden.masked_fill(~visible, float("-inf"))
        mask, top_left = (hidden if mask is None else mask + hidden), False
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal != "none" and top_left, attn_mask=mask, scale=scale)
    if group > 1:
        grad_k, grad_v = (g.unflatten(1, (-1, group)).sum(dim=2) for g in (grad_k, grad_v))
    if sinks is None:
        return grad_q, grad_k, grad_v
    row_dot = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
    return grad_q, grad_k, grad_v, sink_gradient(sinks, lse, row_dot).to(sinks.dtype)


def attention_grad_lowering(op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
    """The OpLowering of ft.attention_grad on the cpu backend."""
    problem = unsupported_reason(op)
    if problem:
        raise UnsupportedRegion(problem)
    callee = writer.bind("cpu_flash_attention_backward", flash_attention_backward)
    attrs = op.attributes
    optional = [f"mask={operands[6]}"] if attrs["has_mask"] else []
    if attrs["has_sinks"]:
        optional.append(f"sinks={operands[-1]}")
    results = [writer.new_buffer() for _ in op.results]
    arguments = [*operands[:6], *optional, f"scale={attrs['scale']!r}", f"causal={attrs['causal']!r}",
                 f"window={attrs['window']}"]
    writer.line(f"{', '.join(results)} = {callee}({', '.join(arguments)})")
    return results
