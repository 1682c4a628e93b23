"""Tiny model zoo for flagtree tests, examples and benchmarks.

Each factory returns ``(model, example_inputs)`` with the model in eval mode. Sizes are
shrunk to run in milliseconds on a CPU; the op structure follows DeepSeek-V3 (see
``MODELS.md`` in the shared notes) so that fusion passes see realistic graphs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "ZOO",
    "DeepSeekBlock",
    "Factory",
    "MLAttention",
    "RMSNorm",
    "Rotary",
    "SmallCNN",
    "SmallMoE",
    "SwiGLU",
    "TransformerBlock",
    "causal_attention",
    "make_cnn",
    "make_deepseek_block",
    "make_mlp",
    "make_moe",
    "make_transformer_block",
]

Factory = Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]


# --------------------------------------------------------------------------- pieces


class RMSNorm(nn.Module):
    """RMSNorm written out (not ``F.rms_norm``) so fuse-norm sees the real pattern."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference models normalise in fp32 even for bf16 activations.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary embedding on the last dim of ``(B, T, H, D)`` tensors.

    ``interleaved=False`` rotates the two halves (Llama / HF style); ``True`` rotates
    adjacent pairs, the real-arithmetic form of DeepSeek's complex ``view_as_complex``.
    """

    def __init__(
        self,
        dim: int,
        max_seq: int = 64,
        base: float = 10000.0,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        assert dim % 2 == 0
        self.interleaved = interleaved
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float64), inv_freq)
        # Non-persistent: derived constants, not weights; tables are max_seq long and
        # sliced by the actual length so one compiled graph serves every length.
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.cos.shape[0]:
            raise ValueError(
                f"sequence length {t} exceeds rotary max_seq {self.cos.shape[0]}"
            )
        cos = self.cos[:t, None, :].to(x.dtype)  # (T, 1, D/2), broadcasts over heads
        sin = self.sin[:t, None, :].to(x.dtype)
        if self.interleaved:
            xp = x.unflatten(-1, (-1, 2))
            x0, x1 = xp[..., 0], xp[..., 1]
            return torch.stack(
                (x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1
            ).flatten(-2)
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Explicit causal attention on ``(B, H, T, D)`` tensors, softmax upcast to fp32."""
    t = q.shape[-2]
    # Built from the runtime length (not a max_seq buffer) so dynamic T stays symbolic.
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = (q @ k.transpose(-2, -1)) * scale
    probs = torch.softmax(
        scores.masked_fill(mask, float("-inf")), dim=-1, dtype=torch.float32
    )
    return probs.to(q.dtype) @ v


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear → GELU → Linear → LayerNorm."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(self.act(self.fc1(x))))


class SmallCNN(nn.Module):
    """Two conv/BN/ReLU stages, max-pool, global average pool, classifier."""

    def __init__(self, in_ch: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TransformerBlock(nn.Module):
    """Pre-norm Llama-style decoder block: RMSNorm, RoPE, causal GQA, SwiGLU."""

    def __init__(
        self,
        dim: int = 64,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        head_dim: int = 16,
        inter: int = 128,
        max_seq: int = 64,
    ) -> None:
        super().__init__()
        assert n_heads % n_kv_heads == 0
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.attn_norm = RMSNorm(dim)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.rope = Rotary(head_dim, max_seq)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, inter)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.rope(self.wq(x).view(b, t, self.n_heads, self.head_dim))
        k = self.rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = causal_attention(q, k, v, self.head_dim**-0.5)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class SmallMoE(nn.Module):
    """DeepSeek-V3-style MoE layer without data-dependent control flow.

    Router: ``s = sigmoid(x Wg^T)`` in fp32, top-k of ``s + bias`` picks experts,
    weights are ``s`` at those experts, normalised and scaled. ``expert_impl="gather"``
    gathers each token's expert weights (``w[idx]``) and runs ``bmm``; ``"dense"`` runs
    every expert on every token and zeroes unrouted pairs. Plus a shared expert.
    """

    def __init__(
        self,
        dim: int = 32,
        inter: int = 64,
        n_experts: int = 8,
        top_k: int = 2,
        route_scale: float = 2.5,
        n_shared: int = 1,
        expert_impl: str = "gather",
    ) -> None:
        super().__init__()
        if expert_impl not in ("gather", "dense"):
            raise ValueError(
                f"expert_impl must be 'gather' or 'dense', got {expert_impl!r}"
            )
        self.dim, self.n_experts, self.top_k = dim, n_experts, top_k
        self.route_scale = route_scale
        self.expert_impl = expert_impl
        self.gate = nn.Parameter(torch.randn(n_experts, dim) / math.sqrt(dim))
        # A buffer, as in HF's e_score_correction_bias: it is tuned by load balancing,
        # not by gradients. Random so selection differs from plain top-k of s.
        self.register_buffer("bias", 0.1 * torch.randn(n_experts))
        # Stacked expert weights in nn.Linear layout (out, in) so w[idx] is one gather.
        self.w1 = nn.Parameter(torch.randn(n_experts, inter, dim) / math.sqrt(dim))
        self.w3 = nn.Parameter(torch.randn(n_experts, inter, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(n_experts, dim, inter) / math.sqrt(inter))
        self.shared = SwiGLU(dim, inter * n_shared)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, dim)`` → ``(weights (N, k) in x.dtype, indices (N, k) int64)``."""
        s = torch.sigmoid(F.linear(x.float(), self.gate.float()))
        idx = torch.topk(s + self.bias.float(), self.top_k, dim=-1).indices
        w = s.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True) * self.route_scale
        return w.to(x.dtype), idx

    def experts_gather(
        self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        n, k = idx.shape
        flat = idx.reshape(-1)
        xr = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (N*k, 1, dim)
        h1 = torch.bmm(xr, self.w1[flat].transpose(1, 2))  # (N*k, 1, inter)
        h3 = torch.bmm(xr, self.w3[flat].transpose(1, 2))
        y = torch.bmm(F.silu(h1) * h3, self.w2[flat].transpose(1, 2))  # (N*k, 1, dim)
        return (y.view(n, k, self.dim) * w.unsqueeze(-1)).sum(1)

    def experts_dense(
        self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        # Zero weight for unrouted (token, expert) pairs: wasted flops, static shapes.
        dense_w = torch.zeros(
            x.shape[0], self.n_experts, dtype=w.dtype, device=w.device
        )
        dense_w = dense_w.scatter(1, idx, w)
        h1 = torch.einsum("nd,eid->nei", x, self.w1)
        h3 = torch.einsum("nd,eid->nei", x, self.w3)
        y = torch.einsum("nei,edi->ned", F.silu(h1) * h3, self.w2)
        return (y * dense_w.unsqueeze(-1)).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        w, idx = self.route(x)
        experts = (
            self.experts_gather if self.expert_impl == "gather" else self.experts_dense
        )
        return (experts(x, w, idx) + self.shared(x)).view(shape)


class MLAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention (prefill form, no KV cache).

    q goes through a low-rank bottleneck; k/v come from a compressed latent plus one
    rope key shared by all heads. qk head dim (nope + rope) differs from v head dim.
    """

    def __init__(
        self,
        dim: int = 64,
        n_heads: int = 4,
        q_lora_rank: int = 32,
        kv_lora_rank: int = 32,
        qk_nope_dim: int = 16,
        qk_rope_dim: int = 8,
        v_dim: int = 16,
        max_seq: int = 64,
    ) -> None:
        super().__init__()
        self.n_heads, self.kv_lora_rank = n_heads, kv_lora_rank
        self.qk_nope_dim, self.qk_rope_dim, self.v_dim = qk_nope_dim, qk_rope_dim, v_dim
        qk_dim = qk_nope_dim + qk_rope_dim
        self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
        self.q_norm = RMSNorm(q_lora_rank)
        self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.wkv_b = nn.Linear(
            kv_lora_rank, n_heads * (qk_nope_dim + v_dim), bias=False
        )
        self.wo = nn.Linear(n_heads * v_dim, dim, bias=False)
        self.rope = Rotary(qk_rope_dim, max_seq, interleaved=True)
        self.scale = qk_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.n_heads
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(b, t, h, -1)
        q_nope, q_pe = q.split([self.qk_nope_dim, self.qk_rope_dim], dim=-1)
        q = torch.cat((q_nope, self.rope(q_pe)), dim=-1)

        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_dim], dim=-1)
        k_pe = self.rope(
            k_pe.unsqueeze(2)
        )  # (B, T, 1, rope): one rope key for all heads
        kv = self.wkv_b(self.kv_norm(kv)).view(b, t, h, -1)
        k_nope, v = kv.split([self.qk_nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, -1, h, -1)), dim=-1)

        o = causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale
        )
        return self.wo(o.transpose(1, 2).reshape(b, t, h * self.v_dim))


class DeepSeekBlock(nn.Module):
    """Tiny DeepSeek-V3 layer: RMSNorm → MLA → residual, RMSNorm → MoE → residual."""

    def __init__(
        self,
        dim: int = 64,
        n_heads: int = 4,
        moe_inter: int = 64,
        n_experts: int = 8,
        top_k: int = 2,
        max_seq: int = 64,
        expert_impl: str = "gather",
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = MLAttention(dim, n_heads, max_seq=max_seq)
        self.ffn_norm = RMSNorm(dim)
        self.ffn = SmallMoE(dim, moe_inter, n_experts, top_k, expert_impl=expert_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


# --------------------------------------------------------------------------- factories


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    # fork_rng so building a model never disturbs the caller's global RNG stream.
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = model.to(device=device, dtype=dtype).eval()
    inputs = tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        for t in inputs
    )
    return model, inputs


def make_mlp(
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    batch: int = 4,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``MLP`` on a ``(batch, 32)`` input."""
    with _seeded(seed):
        model = MLP()
        x = torch.randn(batch, 32)
    return _finish(model, (x,), dtype, device)


def make_cnn(
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    batch: int = 2,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``SmallCNN`` on a ``(batch, 3, 16, 16)`` input; BatchNorm stats randomised."""
    with _seeded(seed):
        model = SmallCNN()
        # Non-trivial running stats, so eval-mode BN is not an identity.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        x = torch.randn(batch, 3, 16, 16)
    return _finish(model, (x,), dtype, device)


def _randomise_norms(model: nn.Module) -> None:
    # RMSNorm weights start at ones; perturb so a pass that drops the multiply shows.
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.data.uniform_(0.5, 1.5)


def make_transformer_block(
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    batch: int = 2,
    seq: int = 8,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``TransformerBlock`` (hidden 64, 4 q / 2 kv heads) on ``(batch, seq, 64)``."""
    with _seeded(seed):
        model = TransformerBlock()
        _randomise_norms(model)
        x = torch.randn(batch, seq, 64)
    return _finish(model, (x,), dtype, device)


def make_moe(
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    batch: int = 2,
    seq: int = 8,
    expert_impl: str = "gather",
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``SmallMoE`` (hidden 32, inter 64, 8 experts, top-2) on ``(batch, seq, 32)``."""
    with _seeded(seed):
        model = SmallMoE(expert_impl=expert_impl)
        x = torch.randn(batch, seq, 32)
    return _finish(model, (x,), dtype, device)


def make_deepseek_block(
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    batch: int = 1,
    seq: int = 16,
    expert_impl: str = "gather",
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``DeepSeekBlock`` (hidden 64, MLA, 8-expert MoE) on ``(batch, seq, 64)``."""
    with _seeded(seed):
        model = DeepSeekBlock(expert_impl=expert_impl)
        _randomise_norms(model)
        x = torch.randn(batch, seq, 64)
    return _finish(model, (x,), dtype, device)


ZOO: dict[str, Factory] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "transformer_block": make_transformer_block,
    "moe": make_moe,
    "deepseek_block": make_deepseek_block,
}
