"""Explicit attention spellings in training (frontend/explicit_attention.py): the forward graph
holds one ft.attention, the backward one ft.attention_grad, and every gradient matches fp64,
with static sizes and with symbolic ones (batch, heads and lengths dynamic)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import flagtree
from examples.zoo import ZOO
from flagtree.frontend import explicit_attention
from tests.frontend_helpers import TOLERANCE, assert_matches_fp64, fp64_twin
from tests.test_training import training_step


def causal_masked_fill(q, k, v):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    hidden = torch.triu(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool), 1)
    return torch.softmax(scores.masked_fill(hidden, float("-inf")).float(), dim=-1).to(q.dtype) @ v


def scaled_q_gqa(q, k, v):
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v


def sliding_window_where(q, k, v):
    rows = torch.arange(q.shape[-2])[:, None]
    keys = torch.arange(k.shape[-2])[None, :]
    visible = (keys <= rows) & (rows - keys < 4)
    scores = torch.where(visible, q @ k.transpose(-1, -2) * 0.3, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def padding_mask_einsum(q, k, v, keep):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1), v)


def sink_column(q, k, v, sinks):
    scores = q @ k.transpose(-1, -2) * 0.25
    column = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1] @ v


SPELLINGS = {
    "causal masked_fill, f32 softmax": (causal_masked_fill, (4, 4), False, True),
    "scale on q, GQA by repeat_interleave": (scaled_q_gqa, (4, 2), False, True),
    "sliding window by where": (sliding_window_where, (2, 2), False, True),
    "einsum, padding mask by masked_fill": (padding_mask_einsum, (2, 2), True, True),
}


def _inputs(heads: tuple[int, int], generator: torch.Generator) -> list[torch.Tensor]:
    shapes = [(2, heads[0], 9, 8), (2, heads[1], 11, 8), (2, heads[1], 11, 8)]
    return [torch.randn(s, generator=generator).requires_grad_() for s in shapes]


def _train(fn, inputs, extra, compiled=None) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Gradients of a random weighting of fn's output, compiled on the interpret backend (or by
    `compiled`), and the fusions of its graphs."""
    flagtree.clear_reports()
    compiled = compiled or torch.compile(fn, backend="flagtree", options={"target": "interpret"})
    out = compiled(*inputs, *extra)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    twins = [t.detach().double().requires_grad_() for t in inputs]
    twin_extra = (e.detach().double() if e.is_floating_point() else e for e in extra)
    (fn(*twins, *twin_extra) * weights.double()).sum().backward()
    for name, actual, twin in zip("qkv", inputs, twins):
        assert_matches_fp64(actual.grad, twin.grad, torch.float32, f"gradient of {name}")
    fusions: dict[str, int] = {}
    for report in flagtree.reports():
        for kind, n in report.fusions.items():
            fusions[kind] = fusions.get(kind, 0) + n
    return inputs, fusions


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_explicit_spellings_train_through_attention_and_its_gradient(name):
    fn, heads, has_mask, fuses = SPELLINGS[name]
    generator = torch.Generator().manual_seed(3)
    extra = (torch.rand(2, 1, 1, 11, generator=generator) > 0.3,) if has_mask else ()
    _, fusions = _train(fn, _inputs(heads, generator), extra)
    fused = {kind: n for kind, n in fusions.items() if kind.startswith("attention")}
    assert fused == ({"attention": 1, "attention_grad": 1} if fuses else {}), fused


def test_sinks_train_fused_with_their_gradient():
    """Per-head sink logits (gpt-oss, DeepSeek-V4) are a leaf too: ft.attention_grad gives them
    −Σ exp(sink − lse)·D, which matches fp64."""
    generator = torch.Generator().manual_seed(4)
    sinks = torch.randn(2, generator=generator).requires_grad_()
    twin = sinks.detach().double().requires_grad_()
    inputs = _inputs((2, 2), generator)
    _, fusions = _train(sink_column, inputs, (sinks,))
    assert {"attention", "attention_grad"} <= set(fusions)
    twins = [t.detach().double() for t in inputs]
    weights = torch.randn(2, 2, 9, 8, generator=torch.Generator().manual_seed(1)).double()
    (sink_column(*twins, twin) * weights).sum().backward()
    assert_matches_fp64(sinks.grad, twin.grad, torch.float32, "gradient of the sinks")


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_symbolic_sizes_train_fused(name):
    """Batch, heads and lengths marked dynamic: the trace keeps Dynamo's symbols and the sizes
    fuse-attention computed are spelled back in FX (sym_size, arithmetic), so training still
    runs ft.attention and ft.attention_grad, and one compiled graph serves other sizes."""
    fn, heads, has_mask, _ = SPELLINGS[name]
    compiled = torch.compile(fn, backend="flagtree", options={"target": "interpret"})
    for batch, lengths, seed in ((2, (9, 11), 5), (3, (6, 14), 6)):
        generator = torch.Generator().manual_seed(seed)
        shapes = [(batch, heads[0], lengths[0], 8), *[(batch, heads[1], lengths[1], 8)] * 2]
        inputs = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
        for t, dim in itertools.product(inputs, (0, 1, 2)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        extra = (torch.rand(batch, 1, 1, lengths[1], generator=generator) > 0.3,) if has_mask else ()
        _, fusions = _train(fn, inputs, extra, compiled)
        compiled_now = {kind: n for kind, n in fusions.items() if kind.startswith("attention")}
        assert compiled_now == ({"attention": 1, "attention_grad": 1} if seed == 5 else {}), compiled_now


@pytest.mark.parametrize("name", ["transformer_block", "deepseek_block"])
def test_zoo_attention_trains_fused(name):
    """The zoo's transformer block (explicit causal attention) and DeepSeek block (MLA) train
    through ft.attention and ft.attention_grad, every parameter's gradient matching fp64."""
    model, inputs = ZOO[name]()
    twin, twin_inputs = fp64_twin(model, inputs)
    _, reference = training_step(twin, twin, twin_inputs)
    flagtree.clear_reports()
    compiled = torch.compile(model, backend="flagtree", options={"target": "interpret"})
    _, grads = training_step(model, compiled, inputs)
    for parameter, grad in grads.items():
        assert_matches_fp64(grad, reference[parameter], torch.float32, f"{name}: gradient of {parameter}")
    kinds = {kind for report in flagtree.reports() for kind in report.fusions}
    assert {"attention", "attention_grad"} <= kinds
    assert TOLERANCE[torch.float32]


def test_a_scale_from_a_symbolic_head_dim_trains_fused():
    """dynamic=True makes the head dim symbolic too: the scale d ** -0.5 is then Python
    arithmetic on a SymFloat, which the trace imports as f64 scalar ops (ft.attention takes the
    run-time scale).  The kernels need static head dims, so here they run their reference."""
    generator = torch.Generator().manual_seed(8)
    compiled = torch.compile(scaled_q_gqa, backend="flagtree", options={"target": "interpret"}, dynamic=True)
    _, fusions = _train(scaled_q_gqa, _inputs((4, 2), generator), (), compiled)
    assert {"attention", "attention_grad"} <= set(fusions)


def test_a_graph_the_rewiring_cannot_trace_trains_unfused_and_says_why(monkeypatch, caplog):
    """When the forward-only trace fails, the graph trains as it would without this step (the
    decomposed attention, probabilities saved), exactly, and the log says why."""

    def failing_trace(gm, decompositions):
        raise RuntimeError("no trace for this graph")

    monkeypatch.setattr(explicit_attention, "_trace", failing_trace)
    generator = torch.Generator().manual_seed(9)
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        _, fusions = _train(causal_masked_fill, _inputs((2, 2), generator), ())
    assert "attention_grad" not in fusions and fusions  # compiled, unfused
    assert "stays unfused: RuntimeError: no trace for this graph" in caplog.text
