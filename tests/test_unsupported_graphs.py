"""Graphs that use a construct FTIR cannot express (a higher-order op taking a subgraph, such as
flex_attention's score_mod) compile to eager torch as one counted fallback, with the reason in
the report, instead of failing torch.compile."""

from __future__ import annotations

import pytest
import torch

import flagtree

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention


def _causal(score, batch, head, query, key):
    return torch.where(query >= key, score, -float("inf"))


def _flex(q, k, v):
    return flex_attention(q, k, v, score_mod=_causal)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    flagtree.clear_reports()


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_flex_attention_runs_eagerly_and_is_reported(mode):
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with torch.no_grad():
        actual = torch.compile(_flex, backend="flagtree", mode=mode)(q, k, v)
        expected = _flex(q, k, v)
    torch.testing.assert_close(actual, expected)
    (report,) = flagtree.reports()
    assert report.backend == "eager" and report.fallbacks == {"flex_attention": 1}
    assert "whole graph runs in eager torch" in report.fallback_reasons["flex_attention"]
    assert "subgraph" in report.fallback_reasons["flex_attention"]
    assert report.notes == (["cuda_graphs not applied: the graph runs in eager torch"] if mode else [])


def test_torch_cond_runs_eagerly_and_is_reported():
    def branchy(x):
        return torch.cond(x.sum() > 0, lambda x: x.sin(), lambda x: x.cos(), (x,))

    for x in (torch.ones(8), -torch.ones(8)):
        torch._dynamo.reset()
        flagtree.clear_reports()
        torch.testing.assert_close(torch.compile(branchy, backend="flagtree")(x), branchy(x))
        (report,) = flagtree.reports()
        assert report.backend == "eager" and report.fallbacks == {"cond": 1}


def test_frozen_parameters_reach_the_eager_graph():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, q, k, v):
            return _flex(q * self.weight, k, v)

    model = Scaled()
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with torch.no_grad():
        actual = torch.compile(model, backend="flagtree", options={"freeze": True})(q, k, v)
        torch.testing.assert_close(actual, model(q, k, v))
