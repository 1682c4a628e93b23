"""Graphs that use a construct FTIR cannot express (a higher-order op taking a subgraph, such as
torch.cond's branches) compile to eager torch as one counted fallback, with the reason in the
report, instead of failing torch.compile."""

from __future__ import annotations

import pytest
import torch

import flagtree


def _branchy(x, weight):
    return torch.cond(x.sum() > 0, lambda x: (x * weight).sin(), lambda x: (x * weight).cos(), (x,))


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    flagtree.clear_reports()


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_torch_cond_runs_eagerly_and_is_reported(mode, sign):
    x, weight = sign * torch.ones(8), torch.randn(8)
    torch.testing.assert_close(torch.compile(_branchy, backend="flagtree", mode=mode)(x, weight), _branchy(x, weight))
    (report,) = flagtree.reports()
    assert report.backend == "eager" and report.fallbacks == {"cond": 1}
    reason = report.fallback_reasons["cond"]
    assert "whole graph runs in eager torch" in reason and "subgraph" in reason
    assert report.notes == (["cuda_graphs not applied: the graph runs in eager torch"] if mode else [])


def test_frozen_parameters_reach_the_eager_graph():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return _branchy(x, self.weight)

    model, x = Branchy(), torch.randn(8)
    with torch.no_grad():
        actual = torch.compile(model, backend="flagtree", options={"freeze": True})(x)
        torch.testing.assert_close(actual, model(x))
    assert flagtree.reports()[0].backend == "eager"
