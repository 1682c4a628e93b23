"""`ft.attention`: scaled dot-product attention as one op (produced by fuse-attention and the importer).

Semantics (every backend must match the reference below):

    q: [B, Hq, Sq, Dqk]   k: [B, Hkv, Skv, Dqk]   v: [B, Hkv, Skv, Dv]   result: [B, Hq, Sq, Dv], q's dtype

- Query head h reads KV head h // (Hq / Hkv) (GQA / MQA; Hq must be a multiple of Hkv), as
  `repeat_interleave` and SDPA's `enable_gqa` do.
- Scores s[i, j] = scale · Σ_d q[i, d]·k[j, d], computed in f32 (or f64 for f64 inputs).
- Visibility: with `causal` = "upper_left" the offset is 0, with "lower_right" it is Skv − Sq
  (a query block at the end of the keys, as in decode with a KV cache); key j is visible to
  query i iff j ≤ i + offset, and, when `window` > 0, also i + offset − j < window (the query
  sees its `window` most recent keys, itself included).  "none" makes every key visible; a
  window needs a causal offset.
- Mask (operand 3 when `has_mask`), broadcastable to [B, Hq, Sq, Skv]: i1 keeps the keys where
  it is true; a float mask is added to the scores (−inf hides a key).
- Sinks (the last operand when `has_sinks`), [Hq]: one logit per head that joins the softmax
  denominator and carries no value (Σ_j exp(s_ij − m) + exp(sink_h − m)).
- p = softmax_j(s) over the visible keys; result = p · v, cast to q's dtype.  A row that sees no
  key (and has no sink) is defined as 0, never NaN.
- `with_lse` (for training) adds a second result, lse: [B, Hq, Sq] f32 (f64 for f64 inputs),
  the natural-log log-sum-exp of each row's visible scores and sink, +inf for a row that sees
  no key and has no sink, so that exp(s − lse) recomputes p, and is 0 on such rows.

`ft.attention_grad` is the backward of `ft.attention` given the forward's result and lse:

    operands: q, k, v, out, grad_out, lse, [mask], [sinks]
    results:  grad_q, grad_k, grad_v, [grad_sinks]   (the types of q, k, v, sinks)

With p = exp(s − lse) on the visible keys (0 elsewhere) and D_i = Σ_d grad_out[i, d]·out[i, d]:
grad_v = pᵀ·grad_out, grad_s = p ∘ (grad_out·vᵀ − D), grad_q = scale·grad_s·k and
grad_k = scale·grad_sᵀ·q, all in f32 (f64 for f64), with grad_k and grad_v summed over each KV
head's query heads; a sink's gradient is −Σ_{batch, row} exp(sink − lse)·D (its weight times
what the row's output moves).  Same attributes as ft.attention except with_lse; a mask gets no
gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from flagtree.ir.core import Operation
from flagtree.ir.opdef import FUSED, PURE, AttrSpec, OpDef, register
from flagtree.ir.types import ScalarType, TensorType, Type, broadcast_shapes

CAUSAL_KINDS = ("none", "upper_left", "lower_right")
_FLOAT_TYPES = frozenset({"f64", "f32", "f16", "bf16"})

ATTENTION_ATTRS = {
    "scale": AttrSpec((float,), "multiplies q·kᵀ"),
    "causal": AttrSpec((str,), "none | upper_left | lower_right (the causal diagonal's offset: 0 or Skv − Sq)"),
    "window": AttrSpec((int,), "sliding window: each query sees its `window` latest visible keys; 0 = unlimited"),
    "has_mask": AttrSpec((bool,), "operand 3 is a mask (i1: keep where true; float: added to the scores)"),
    "has_sinks": AttrSpec((bool,), "the last operand holds one sink logit per query head, [Hq]"),
    "with_lse": AttrSpec((bool,), "a second result: each row's log-sum-exp, [B, Hq, Sq] f32 (training)",
                         required=False),
}
GRAD_ATTRS = {name: spec for name, spec in ATTENTION_ATTRS.items() if name != "with_lse"}


def _dims_agree(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b


def _operand_types(op: Operation, leading: tuple[str, ...]) -> list[TensorType] | str:
    """The operand types of an ft.attention(_grad) whose operands are `leading`, then the mask and
    sinks its attributes announce, once they form an attention; else why not."""
    a = op.attributes
    names = [*leading, *(["mask"] if a["has_mask"] else []), *(["sinks"] if a["has_sinks"] else [])]
    if len(op.operands) != len(names):
        return f"expected {len(names)} operands ({', '.join(names)}), got {len(op.operands)}"
    types = [v.type for v in op.operands]
    if not all(isinstance(t, TensorType) for t in types):
        return "every operand must be a tensor"
    problem = _check_attention_types(types[:3], types[len(leading)] if a["has_mask"] else None,
                                     types[-1] if a["has_sinks"] else None, a)
    return problem or types


def _result_type(q: TensorType, v: TensorType) -> TensorType:
    return TensorType((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q.dtype)


def _check_attention_types(qkv: list[TensorType], mask: TensorType | None, sinks: TensorType | None,
                           a: dict[str, Any]) -> str | None:
    """Why q, k, v, the mask and the sinks do not form an attention, or None."""
    q, k, v = qkv
    if any(t.rank != 4 for t in (q, k, v)):
        return f"q, k and v must have rank 4 [batch, heads, seq, dim], got {q}, {k}, {v}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype.name not in _FLOAT_TYPES:
        return f"q, k and v must share one float element type, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (_dims_agree(q.shape[0], k.shape[0]) and _dims_agree(k.shape[0], v.shape[0])):
        return "q, k and v must have the same batch size"
    if not (_dims_agree(k.shape[1], v.shape[1]) and _dims_agree(k.shape[2], v.shape[2])):
        return "k and v must have the same number of heads and keys"
    if not _dims_agree(q.shape[3], k.shape[3]):
        return f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}"
    hq, hkv = q.shape[1], k.shape[1]
    if hq is not None and hkv is not None and hq % hkv:
        return f"query heads ({hq}) must be a multiple of KV heads ({hkv})"
    if a["causal"] not in CAUSAL_KINDS:
        return f"causal must be one of {', '.join(CAUSAL_KINDS)}, got '{a['causal']}'"
    if a["window"] < 0 or (a["window"] and a["causal"] == "none"):
        return "window must be >= 0, and a window needs causal = upper_left or lower_right"
    if mask is not None:
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            ok = mask.rank == 4 and broadcast_shapes(mask.shape, scores) is not None
        except ValueError:
            ok = False
        if not ok or not (mask.dtype.name == "i1" or mask.dtype.name in _FLOAT_TYPES):
            return f"mask {mask} must be i1 or float, rank 4, broadcastable to [B, Hq, Sq, Skv]"
    if sinks is not None and (sinks.rank != 1 or not _dims_agree(sinks.shape[0], hq)
                              or sinks.dtype.name not in _FLOAT_TYPES):
        return f"sinks {sinks} must be a float vector with one logit per query head"
    return None


def _lse_type(q: TensorType) -> TensorType:
    return TensorType(q.shape[:3], ScalarType("f64" if q.dtype.name == "f64" else "f32"))


def _infer_attention(op: Operation) -> list[Type] | str:
    types = _operand_types(op, ("q", "k", "v"))
    if isinstance(types, str):
        return types
    q, _, v = types[:3]
    return [_result_type(q, v), _lse_type(q)] if op.attributes.get("with_lse", False) else [_result_type(q, v)]


def _infer_attention_grad(op: Operation) -> list[Type] | str:
    types = _operand_types(op, ("q", "k", "v", "out", "grad_out", "lse"))
    if isinstance(types, str):
        return types
    q, k, v, out, grad_out, lse = types[:6]
    expected_out = _result_type(q, v)
    for name, t in (("out", out), ("grad_out", grad_out)):
        if t.dtype != q.dtype or t.rank != 4 or not all(map(_dims_agree, t.shape, expected_out.shape)):
            return f"{name} {t} must be the attention's result type {expected_out}"
    if lse.dtype != _lse_type(q).dtype or lse.rank != 3 or not all(map(_dims_agree, lse.shape, q.shape[:3])):
        return f"lse {lse} must be the forward's log-sum-exp, {_lse_type(q)}"
    return [q, k, v, *([types[-1]] if op.attributes["has_sinks"] else [])]


def visible_keys(sq: int, skv: int, causal: str, window: int, device: torch.device | None = None) -> torch.Tensor:
    """[Sq, Skv] bool: which keys each query may see under `causal` and `window` (see the module doc)."""
    if causal == "none":
        return torch.ones(sq, skv, dtype=torch.bool, device=device)
    offset = 0 if causal == "upper_left" else skv - sq
    distance = torch.arange(sq, device=device)[:, None] + offset - torch.arange(skv, device=device)[None, :]
    visible = distance >= 0
    return visible & (distance < window) if window else visible


def _masked_scores(args: list[torch.Tensor], attrs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scaled scores [B, Hq, Sq, Skv] in the compute type with hidden keys at -inf, and k and
    v repeated to Hq heads in that type."""
    q, k, v = args[:3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * attrs["scale"]
    visible = visible_keys(q.shape[2], k.shape[2], attrs["causal"], attrs["window"], q.device)
    if attrs["has_mask"]:
        mask = args[3]
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.to(compute)
    return scores.masked_fill(~visible, float("-inf")), k, v


def attention_reference(args: list[Any], attrs: dict[str, Any],
                        result_types: list[Type]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager ft.attention, computed in f32 (f64 for f64 inputs)."""
    q = args[0]
    scores, _, v = _masked_scores(args, attrs)
    if attrs["has_sinks"]:
        sinks = args[-1].to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sinks], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    probabilities = weights / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    if attrs["has_sinks"]:
        probabilities = probabilities[..., :-1]
    out = torch.matmul(probabilities, v).to(q.dtype)
    if not attrs.get("with_lse", False):
        return out
    lse = torch.where(denominator > 0, row_max + torch.log(denominator), float("inf"))
    return out, lse.squeeze(-1)


def attention_grad_reference(args: list[Any], attrs: dict[str, Any],
                             result_types: list[Type]) -> tuple[torch.Tensor, ...]:
    """Eager ft.attention_grad: the gradients of q, k, v (and the sinks) recomputed from the forward's lse."""
    q, k, v, out, grad_out, lse = args[:6]
    forward_args = [q, k, v, *args[6:7 if attrs["has_mask"] else 6]]
    scores, k_heads, v_heads = _masked_scores(forward_args, attrs)
    compute = scores.dtype
    probabilities = torch.exp(scores - lse.to(compute)[..., None])
    grad_out = grad_out.to(compute)
    grad_v = torch.matmul(probabilities.transpose(-1, -2), grad_out)
    row_dot = (grad_out * out.to(compute)).sum(dim=-1, keepdim=True)
    grad_scores = probabilities * (torch.matmul(grad_out, v_heads.transpose(-1, -2)) - row_dot)
    grad_q = torch.matmul(grad_scores, k_heads) * attrs["scale"]
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.to(compute)) * attrs["scale"]
    grads = (grad_q.to(q.dtype), _sum_groups(grad_k, k.shape[1]).to(k.dtype),
             _sum_groups(grad_v, v.shape[1]).to(v.dtype))
    if not attrs["has_sinks"]:
        return grads
    sinks = args[-1]
    return *grads, sink_gradient(sinks, lse, row_dot.squeeze(-1)).to(sinks.dtype)


def sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, row_dot: torch.Tensor) -> torch.Tensor:
    """−Σ_{batch, row} exp(sink − lse)·D per head, from the lse and D = Σ grad_out·out of each row
    ([B, Hq, Sq]); in lse's type."""
    weights = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)
    return -(weights * row_dot.to(lse.dtype)).sum(dim=(0, 2))


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, S, D] per-query-head gradients summed over each KV head's group: [B, Hkv, S, D]."""
    batch, q_heads, length, dim = grad.shape
    return grad.view(batch, kv_heads, q_heads // kv_heads, length, dim).sum(dim=2)


register(OpDef(
    "ft.attention", "softmax(scale·q·kᵀ, causal/window/mask, sinks)·v with GQA; see ops/attention.py",
    (3, 5), results=(1, 2), attrs=ATTENTION_ATTRS, traits=frozenset({PURE, FUSED}), infer=_infer_attention,
    reference=attention_reference, operand_doc="q, k, v, optional mask, optional sinks",
))
register(OpDef(
    "ft.attention_grad", "the gradients of ft.attention's q, k, v from its result and lse; see ops/attention.py",
    (6, 8), results=(3, 4), attrs=GRAD_ATTRS, traits=frozenset({PURE, FUSED}), infer=_infer_attention_grad,
    reference=attention_grad_reference, operand_doc="q, k, v, out, grad_out, lse, optional mask, optional sinks",
))
