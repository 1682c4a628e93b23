"""Random attention problems for the kernel tests (test_attention_kernel.py, test_attention_backward.py),
and their check against an fp64 evaluation of ft.attention's reference (see test_attention_kernel.py's
doc for the tolerances)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from flagtree.ir.ops.attention import CAUSAL_KINDS, attention_reference, visible_keys

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class Problem:
    batch: int
    heads: tuple[int, int]  # (query heads, KV heads)
    sq: int
    skv: int
    head_dims: tuple[int, int]  # (qk, v)
    dtype: torch.dtype
    causal: str
    window: int
    mask: str  # "none" | "bool" | "additive"
    mask_shape: tuple[bool, bool, bool, bool]  # which dims of [B, Hq, Sq, Skv] the mask has (else 1)
    sinks: bool
    transposed: bool
    logit_scale: float  # the standard deviation of scale·q·k
    path: str  # "default" | "online" | "one_block" | "split"
    seed: int


@st.composite
def problems(draw) -> Problem:
    causal = draw(st.sampled_from(CAUSAL_KINDS))
    skv = draw(st.sampled_from((1, 5, 17, 33, 81)))
    return Problem(
        batch=draw(st.integers(1, 2)),
        heads=draw(st.sampled_from(((1, 1), (2, 2), (4, 2), (8, 2), (4, 1)))),
        sq=draw(st.sampled_from((1, 5, 17, 33))),
        skv=skv,
        head_dims=draw(st.sampled_from(((64, 64), (192, 128), (48, 80), (16, 16), (5, 3)))),
        dtype=draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16))),
        causal=causal,
        window=0 if causal == "none" else draw(st.sampled_from((0, 0, 1, 4, 16))),
        mask=draw(st.sampled_from(("none", "none", "bool", "additive"))),
        mask_shape=draw(st.sampled_from(((False, False, True, True), (True, False, False, True),
                                         (True, True, True, True)))),
        sinks=draw(st.booleans()),
        transposed=draw(st.booleans()),
        logit_scale=draw(st.sampled_from((1.0, 1.0, 1e3))),
        path=draw(st.sampled_from(("default", "online", "one_block", "split"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(p: Problem) -> tuple[list[torch.Tensor | None], float]:
    """q, k, v, mask, sinks (mask/sinks None when absent) and the scale."""
    generator = torch.Generator().manual_seed(p.seed)
    hq, hkv = p.heads
    dqk, dv = p.head_dims

    def tensor(batch: int, heads: int, seq: int, dim: int) -> torch.Tensor:
        if p.transposed:  # [B, S, H, D] read as [B, H, S, D]: strided seq and head dims
            return torch.randn(batch, seq, heads, dim, generator=generator).to(p.dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, dim, generator=generator).to(p.dtype)

    q, k = tensor(p.batch, hq, p.sq, dqk), tensor(p.batch, hkv, p.skv, dqk)
    v = torch.randn(p.batch, hkv, dv, p.skv, generator=generator).to(p.dtype).transpose(2, 3)  # stride_d != 1
    scale = p.logit_scale / math.sqrt(dqk)
    shape = [n if has else 1 for n, has in zip((p.batch, hq, p.sq, p.skv), p.mask_shape)]
    mask = None
    if p.mask != "none":
        keep = torch.rand(shape, generator=generator) < 0.7
        keep[..., 0, :] = False  # a fully masked row
        mask = keep if p.mask == "bool" else torch.where(keep, torch.randn(shape, generator=generator),
                                                         torch.tensor(float("-inf"))).to(p.dtype)
    sinks = None
    if p.sinks:
        sinks = torch.randn(hq, generator=generator)
        sinks[torch.rand(hq, generator=generator) < 0.3] = float("-inf")  # a sink that adds nothing
    return [q, k, v, mask, sinks], scale


def attributes(p: Problem, scale: float) -> dict:
    return {"scale": scale, "causal": p.causal, "window": p.window, "has_mask": p.mask != "none",
            "has_sinks": p.sinks}


def reference(inputs: list[torch.Tensor | None], attrs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ft.attention's reference on `inputs` converted to `dtype` (float tensors only), or as they are."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return attention_reference([convert(t) for t in inputs if t is not None], attrs, [])


def sees_no_key(p: Problem, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, Hq, Sq]: rows with no visible key."""
    visible = visible_keys(p.sq, p.skv, p.causal, p.window).expand(p.batch, p.heads[0], p.sq, p.skv)
    if mask is not None:
        visible = visible & (mask if mask.dtype == torch.bool else mask != float("-inf"))
    return ~visible.any(dim=-1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    norm = expected.double().norm()
    difference = (actual.double() - expected.double()).norm()
    return (difference / norm).item() if norm > 0 else difference.item()


def check(p: Problem, out: torch.Tensor, inputs, scale: float) -> None:
    attrs = attributes(p, scale)
    expected = reference(inputs, attrs, torch.float64)
    assert out.shape == expected.shape and out.dtype == p.dtype
    assert not out.isnan().any()
    eager_error = relative_error(reference(inputs, attrs).to(p.dtype), expected)
    error = relative_error(out, expected)
    assert error <= max(TOLERANCE[p.dtype], 4 * eager_error), f"{p}: error {error:.2e} (eager {eager_error:.2e})"
    if not p.sinks:
        empty = sees_no_key(p, inputs[3])
        assert (out[empty] == 0).all()




def check_lse(p: Problem, lse: torch.Tensor, inputs, scale: float) -> None:
    """The kernel's log-sum-exp: f32, +inf exactly on the rows that see nothing (and have no sink),
    elsewhere within f32 rounding of fp64 (or four times eager f32's error: large logits)."""
    attrs = {**attributes(p, scale), "with_lse": True}
    _, expected = reference(inputs, attrs, torch.float64)
    _, eager = reference(inputs, attrs)
    assert lse.dtype == torch.float32 and lse.shape == expected.shape
    assert torch.equal(lse == float("inf"), expected == float("inf")) and not lse.isnan().any()
    finite = expected.isfinite()
    if finite.any():
        error = (lse.double() - expected)[finite].abs().max().item()
        eager_error = (eager.double() - expected)[finite].abs().max().item()
        bound = max(1e-5 * (1 + expected[finite].abs().max().item()), 4 * eager_error)
        assert error <= bound, f"{p}: lse error {error:.2e} (eager {eager_error:.2e})"
