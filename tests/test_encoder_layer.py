"""nn.TransformerEncoderLayer under torch.no_grad: its fused op, aten._transformer_encoder_layer_fwd,
is decomposed (flagtree/frontend/encoder_layer.py), so the compiled layer fuses its attention and
norms instead of running the op eagerly.  Compiled against eager (which runs the fused op) over
norm placement, activation and every mask the layer takes; and against the module's documented
(non-fused) path for an arbitrary additive float mask, where eager's fused op returns NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flagtree

BATCH, LENGTH, WIDTH, HEADS = 2, 7, 32, 4
MASKS = ("none", "causal", "bool", "padding", "causal+padding")


def _layer(norm_first: bool, activation: str) -> torch.nn.TransformerEncoderLayer:
    return torch.nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, activation=activation,
                                            batch_first=True, norm_first=norm_first).eval()


def _masks(kind: str) -> dict:
    padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding[1, LENGTH - 2:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(LENGTH)
    hidden = torch.rand(LENGTH, LENGTH) > 0.6
    hidden.fill_diagonal_(False)  # every row sees a key
    return {"none": {}, "causal": {"src_mask": causal, "is_causal": True}, "bool": {"src_mask": hidden},
            "padding": {"src_key_padding_mask": padding},
            # both bool: mixing a float and a bool mask makes torch warn, and Dynamo does not trace warnings
            "causal+padding": {"src_mask": causal.isinf(), "src_key_padding_mask": padding}}[kind]


def _compiled(layer: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.reset()
    flagtree.clear_reports()
    return torch.compile(layer, backend="flagtree")


@settings(max_examples=8, deadline=None)
@given(norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]), mask=st.sampled_from(MASKS))
def test_the_compiled_layer_matches_eager_and_fuses_its_attention(norm_first, activation, mask):
    layer = _layer(norm_first, activation)
    x, masks = torch.randn(BATCH, LENGTH, WIDTH), _masks(mask)
    with torch.no_grad():
        expected = layer(x, **masks)
        actual = _compiled(layer)(x, **masks)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    (report,) = flagtree.reports()
    assert report.fusions.get("attention") == 1 and not report.fallbacks


def test_an_additive_float_mask_is_added_as_the_module_documents():
    layer = _layer(norm_first=False, activation="relu")
    x, mask = torch.randn(BATCH, LENGTH, WIDTH), torch.randn(LENGTH, LENGTH)
    with torch.enable_grad():  # parameters that need grad: the module's non-fused path
        documented = layer(x, src_mask=mask).detach()
    with torch.no_grad():
        actual = _compiled(layer)(x, src_mask=mask)
    torch.testing.assert_close(actual, documented, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_a_stack_of_layers_fuses_every_attention(padding):
    encoder = torch.nn.TransformerEncoder(_layer(False, "relu"), 2, enable_nested_tensor=False).eval()
    x = torch.randn(BATCH, LENGTH, WIDTH)
    kwargs = _masks("padding") if padding else {}
    with torch.no_grad():
        torch.testing.assert_close(_compiled(encoder)(x, **kwargs), encoder(x, **kwargs), rtol=1e-5, atol=1e-5)
    (report,) = flagtree.reports()
    assert report.fusions.get("attention") == 2 and not report.fallbacks
