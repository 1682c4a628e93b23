"""`nn.TransformerEncoderLayer`'s fused inference op, decomposed into the layer's own math.

Under `torch.no_grad()` (or with parameters that need no gradient) the layer calls
`torch._transformer_encoder_layer_fwd`, one opaque aten op.  Left whole it could only run
eagerly, a counted fallback with nothing fused inside; decomposed, its attention becomes
`ft.attention` and its norms and feed-forward fuse like any other model's.  The decomposition
is the module's documented forward (its non-fused path): layer norms, the packed q/k/v
in-projection, SDPA, the out-projection and a ReLU or GELU feed-forward, with the norms before
(`norm_first`) or after the residual adds.

Masks reach the op merged by `MultiheadAttention.merge_masks` as additive floats (bool masks
become -inf/0 first): mask type 1 is a [B, L] key-padding mask, type 2 a [B, H, L, L] mask (the
attention mask, plus the padding mask when both were given), type 0 an [L, L] attention mask;
each is added to the scores.  Where a mask holds only 0 and large negative values (what bool
masks and `generate_square_subsequent_mask` give) this is what eager's op computes; for other
float values eager's fused op returns NaN (torch 2.13, CPU), while the module's documented
semantics, and this decomposition, add the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KEY_PADDING_MASK = 1  # merge_masks' mask_type of a [B, L] mask


def transformer_encoder_layer(
    src: torch.Tensor, embed_dim: int, num_heads: int, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, use_gelu: bool, norm_first: bool, eps: float,
    norm_weight_1: torch.Tensor, norm_bias_1: torch.Tensor, norm_weight_2: torch.Tensor, norm_bias_2: torch.Tensor,
    ffn_weight_1: torch.Tensor, ffn_bias_1: torch.Tensor, ffn_weight_2: torch.Tensor, ffn_bias_2: torch.Tensor,
    mask: torch.Tensor | None = None, mask_type: int | None = None,
) -> torch.Tensor:
    """aten._transformer_encoder_layer_fwd (batch-first [B, L, E] input) in torch ops."""
    batch, length, _ = src.shape
    head_dim = embed_dim // num_heads

    def self_attention(x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(batch, length, num_heads, head_dim).transpose(1, 2)
                   for t in F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1))
        additive = mask
        if mask is not None and mask_type == KEY_PADDING_MASK:
            additive = mask.view(batch, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        return F.linear(out.transpose(1, 2).reshape(batch, length, embed_dim), proj_weight, proj_bias)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), ffn_weight_2, ffn_bias_2)

    def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    if norm_first:
        x = src + self_attention(norm(src, norm_weight_1, norm_bias_1))
        return x + feed_forward(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + self_attention(src), norm_weight_1, norm_bias_1)
    return norm(x + feed_forward(x), norm_weight_2, norm_bias_2)
