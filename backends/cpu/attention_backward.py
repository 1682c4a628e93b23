"""`ft.attention_grad` on the cpu backend: torch's CPU flash-attention backward, a library call
(as matmuls are BLAS calls), where it computes the op exactly.

torch's `_scaled_dot_product_flash_attention_for_cpu_backward` takes the forward's log-sum-exp
in ft.attention's convention (natural log, [B, H, Sq], a row that sees nothing at +inf gets
zero gradients), a causal flag aligned to the top left, and an additive or boolean mask.  It
needs equal qk and v head dims and equal head counts (GQA: K and V are repeated to the query
heads and their gradients summed back over each group).  Sinks, windows and a lower-right
diagonal with Sq ≠ Skv raise UnsupportedRegion: the op then runs its reference, counted.
"""

from __future__ import annotations

import torch

from flagtree.backends.lowering import UnsupportedRegion
from flagtree.ir.core import Operation
from flagtree.ir.types import TensorType
from flagtree.runtime.plan import PlanWriter

_DTYPES = frozenset({"f64", "f32", "f16", "bf16"})


def unsupported_reason(op: Operation) -> str | None:
    """Why torch's CPU flash-attention backward cannot compute `op`, or None."""
    q, k, v = (o.type for o in op.operands[:3])
    attrs = op.attributes
    if not all(isinstance(t, TensorType) for t in (q, k, v)) or q.dtype.name not in _DTYPES:
        return f"torch's CPU flash-attention backward takes f64, f32, f16 or bf16, not {q.dtype}"
    if attrs["has_sinks"] or attrs["window"]:
        return "torch's CPU flash-attention backward has no sinks or sliding window"
    if q.shape[3] is None or q.shape[3] != v.shape[3]:
        return f"torch's CPU flash-attention backward needs equal static qk and v head dims, not " \
               f"{q.shape[3]}/{v.shape[3]}"
    if attrs["causal"] == "lower_right" and (q.shape[2] is None or q.shape[2] != k.shape[2]):
        return "torch's CPU flash-attention backward aligns causal masks to the top left (Sq must equal Skv)"
    return None


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None = None, *,
                             scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) of ft.attention through torch's CPU kernel."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    if group > 1:
        grad_k, grad_v = (g.unflatten(1, (-1, group)).sum(dim=2) for g in (grad_k, grad_v))
    return grad_q, grad_k, grad_v


def attention_grad_lowering(op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
    """The OpLowering of ft.attention_grad on the cpu backend."""
    problem = unsupported_reason(op)
    if problem:
        raise UnsupportedRegion(problem)
    callee = writer.bind("cpu_flash_attention_backward", flash_attention_backward)
    attrs = op.attributes
    mask = [f"mask={operands[6]}"] if attrs["has_mask"] else []
    results = [writer.new_buffer() for _ in op.results]
    arguments = [*operands[:6], *mask, f"scale={attrs['scale']!r}", f"causal={attrs['causal'] != 'none'}"]
    writer.line(f"{', '.join(results)} = {callee}({', '.join(arguments)})")
    return results
