"""flex_attention compiled by flagtree (frontend/flex_attention.py): the op becomes torch's math
form of it, and fuse-attention makes ft.attention of the masks it can prove.  Compiled against
eager flex_attention, inference only: torch's flex_attention refuses inputs that need a gradient
on the CPU (it has no CPU backward) before any compiler sees the call."""

from __future__ import annotations

import pytest
import torch

import flagtree

flex_module = pytest.importorskip("torch.nn.attention.flex_attention")
flex_attention, create_block_mask = flex_module.flex_attention, flex_module.create_block_mask

B, H, S, D = 2, 4, 32, 16
WINDOW = 8


def _causal_score(score, batch, head, query, key):
    return torch.where(query >= key, score, -float("inf"))


def _causal_mask(batch, head, query, key):
    return query >= key


def _window_mask(batch, head, query, key):
    return (query >= key) & (query - key < WINDOW)


def _alibi_score(score, batch, head, query, key):
    return score + (key - query) * (head + 1) * 0.1


def _compile(fn):
    torch._dynamo.reset()
    flagtree.clear_reports()
    return torch.compile(fn, backend="flagtree")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case,fused", [("causal score_mod", True), ("causal block_mask", True),
                                        ("sliding-window block_mask", True), ("alibi score_mod", False)])
def test_flex_attention_matches_eager(case, fused):
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    if case.endswith("block_mask"):
        mask_mod = _causal_mask if case.startswith("causal") else _window_mask
        block_mask = create_block_mask(mask_mod, None, None, S, S, device="cpu")

        def attend(q, k, v):
            return flex_attention(q, k, v, block_mask=block_mask)
    else:
        score_mod = _causal_score if case.startswith("causal") else _alibi_score

        def attend(q, k, v):
            return flex_attention(q, k, v, score_mod=score_mod)

    with torch.no_grad():
        torch.testing.assert_close(_compile(attend)(q, k, v), attend(q, k, v), rtol=1e-5, atol=1e-5)
    (report,) = flagtree.reports()
    assert not report.fallbacks
    if fused:
        assert report.fusions.get("attention") == 1
