"""F.scaled_dot_product_attention imports as one ft.attention: every argument (attn_mask bool and
float of any broadcast rank, is_causal, scale, enable_gqa), rank-3 inputs, CausalBias, dynamic
shapes, compiled vs an fp64 eager evaluation on the reference and the default backend; training
and dropout run through torch's kernels, counted; the CUDA kernels' aten ops map by their schemas."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import flagtree
from flagtree.ir import parse_module
from tests.frontend_helpers import TOLERANCE, assert_matches_fp64, relative_error
from tests.test_dynamic import counting_flagtree
from tests.test_importer import import_function, run_imported

ATTENTION = "aten._scaled_dot_product_flash_attention_for_cpu.default"
aten = torch.ops.aten


class Attention(torch.nn.Module):
    """A module whose forward is one F.scaled_dot_product_attention call."""

    def __init__(self, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                 dropout_p: float = 0.0):
        super().__init__()
        self.options = {"is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa, "dropout_p": dropout_p}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)


@dataclass
class Case:
    """One SDPA call: the module, its inputs, and which keys each query row sees."""

    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    visible: torch.Tensor  # bool, broadcastable to the output's [..., Sq] rows × Skv keys

    def defined_rows(self, out: torch.Tensor) -> torch.Tensor:
        """[..., Sq] bool: the rows that see at least one key (eager may give NaN for the others)."""
        return self.visible.any(-1).expand(out.shape[:-1])


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype)


@st.composite
def sdpa_cases(draw: st.DrawFn) -> Case:
    """Shapes with Sq ≠ Skv, GQA groups, rank 3 or 4, masks bool or float of every broadcast form
    (some hiding every key from a row), is_causal, a given or default scale; f32 or bf16."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    q_len, kv_len = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    batch = draw(st.sampled_from([None, 1, 2]))  # None: rank-3 [H, S, D] inputs
    lead = () if batch is None else (batch,)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = _random((*lead, kv_heads * group, q_len, head_dim), dtype, generator)
    k = _random((*lead, kv_heads, kv_len, head_dim), dtype, generator)
    v = _random((*lead, kv_heads, kv_len, head_dim), dtype, generator)
    is_causal = draw(st.booleans())
    visible = torch.ones(q_len, kv_len, dtype=torch.bool)
    if is_causal:
        visible = torch.tril(visible)
    model = Attention(is_causal, draw(st.none() | st.floats(0.05, 1.0)), group > 1 or draw(st.booleans()))
    # SDPA rejects attn_mask together with is_causal.
    kind = None if is_causal else draw(st.sampled_from([None, "bool", "float"]))
    if kind is None:
        return Case(model, (q, k, v), visible)
    # The scores' trailing dims, any of them but the keys' broadcast (size 1).
    scores_shape = (*lead, kv_heads * group, q_len, kv_len)
    rank = draw(st.integers(2, len(scores_shape)))
    shape = [1 if draw(st.booleans()) else n for n in scores_shape[-rank:-1]] + [kv_len]
    keep = torch.rand(shape, generator=generator) > 0.3
    if draw(st.booleans()):
        keep[..., draw(st.integers(0, shape[-2] - 1)), :] = False  # a row that sees no key
    if kind == "bool":
        mask = keep
    else:
        bias = torch.randn(shape, generator=generator).to(dtype)
        mask = bias.masked_fill(~keep, float("-inf"))
    return Case(model, (q, k, v, mask), visible & keep)


def fp64_reference(case: Case) -> torch.Tensor:
    """The case's module run by eager torch on fp64 copies of its float tensors (a CausalBias stays)."""
    return case.model(*(t.double() if type(t) is torch.Tensor and t.is_floating_point() else t for t in case.inputs))


def assert_matches_on_defined_rows(out: torch.Tensor, case: Case, what: str) -> None:
    """fp64 agreement on the rows that see a key; ft.attention's 0 (never NaN) on the others."""
    assert not out.isnan().any(), f"{what}: NaN in the output"
    defined = case.defined_rows(out)
    reference = fp64_reference(case)
    assert out.shape == reference.shape and out.dtype == case.inputs[0].dtype
    error = relative_error(out[defined], reference[defined])
    assert error <= TOLERANCE[out.dtype], f"{what}: relative error {error:.3g} vs fp64"
    assert (out[~defined] == 0).all(), f"{what}: a row that sees no key is not 0"


def compile_and_run(case: Case, options: dict[str, Any]) -> torch.Tensor:
    torch._dynamo.reset()
    flagtree.clear_reports()
    with torch.no_grad():
        return torch.compile(case.model, backend="flagtree", options=options)(*case.inputs)


def assert_one_attention_and_no_fallback() -> None:
    (report,) = flagtree.reports()
    assert report.fusions.get("attention") == 1, report.summary()
    assert report.fallbacks == {}, report.summary()


@settings(max_examples=30)
@given(case=sdpa_cases())
def test_sdpa_compiles_to_one_attention_matching_fp64_on_the_reference_backend(case):
    out = compile_and_run(case, {"target": "reference"})
    assert_one_attention_and_no_fallback()
    assert_matches_on_defined_rows(out, case, "reference backend")


@settings(max_examples=10)
@given(case=sdpa_cases())
def test_sdpa_compiles_to_one_attention_matching_fp64_on_the_default_backend(case):
    """The default CPU backend gets the same ft.attention (it runs its own lowering, or the op's
    reference: either way no ft.torch_call, so the report counts no fallback)."""
    out = compile_and_run(case, {})
    assert_one_attention_and_no_fallback()
    assert_matches_on_defined_rows(out, case, "default backend")


def _attention_ops(tmp_path, case: Case) -> list[Any]:
    """The ft.attention ops of the FTIR imported for `case` (read back from the dump)."""
    compile_and_run(case, {"target": "reference", "dump_dir": str(tmp_path)})
    (dumped,) = tmp_path.glob("graph_*_inference/input.ftir")
    module = parse_module(dumped.read_text(), str(dumped))
    return [op for op in module.walk() if op.name == "ft.attention"]


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")  # the rows ft.attention defines as 0
@pytest.mark.parametrize("q_len,kv_len", [(5, 9), (9, 5), (6, 6)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_objects_import_as_attention(tmp_path, variant, q_len, kv_len):
    """CausalBias(upper_left) reaches SDPA as is_causal; on CPU, lower_right (Sq ≠ Skv) is
    materialized into a bool mask (tril with the Skv − Sq diagonal), imported as the mask operand."""
    make_bias = causal_upper_left if variant == "upper_left" else causal_lower_right
    generator = torch.Generator().manual_seed(q_len * kv_len)
    q, k, v = (_random((2, 3, n, 8), torch.float32, generator) for n in (q_len, kv_len, kv_len))
    offset = 0 if variant == "upper_left" else kv_len - q_len
    case = Case(Attention(), (q, k, v, make_bias(q_len, kv_len)),
                torch.tril(torch.ones(q_len, kv_len, dtype=torch.bool), diagonal=offset))
    (attention,) = _attention_ops(tmp_path, case)
    assert_one_attention_and_no_fallback()
    materialized = variant == "lower_right" and q_len != kv_len
    expected_causal = "none" if materialized else "upper_left"
    assert (attention.attributes["causal"], attention.attributes["has_mask"]) == (expected_causal, materialized)
    with torch.no_grad():
        out = torch.compile(case.model, backend="flagtree", options={"target": "reference"})(*case.inputs)
    assert_matches_on_defined_rows(out, case, variant)


def test_a_low_rank_mask_is_reshaped_to_rank_4_and_the_scale_is_kept(tmp_path):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (_random((2, 4, n, 8), torch.float32, generator) for n in (5, 7, 7))
    mask = _random((5, 7), torch.float32, generator)
    case = Case(Attention(scale=0.3), (q, k, v, mask), torch.ones(5, 7, dtype=torch.bool))
    (attention,) = _attention_ops(tmp_path, case)
    assert str(attention.operands[3].type) == "tensor<1x1x5x7xf32>"
    assert attention.attributes["scale"] == 0.3 and attention.attributes["causal"] == "none"


@pytest.mark.parametrize("target", ["cpu", "interpret"])
@pytest.mark.parametrize("name,model,kv_heads,mask", [
    ("plain", Attention(), 4, None),
    ("causal", Attention(is_causal=True), 4, None),
    ("gqa", Attention(enable_gqa=True, scale=0.2), 2, None),
    ("float-mask", Attention(), 4, torch.randn(5, 7, generator=torch.Generator().manual_seed(1))),
])
def test_training_fuses_forward_and_backward_and_matches_fp64_gradients(name, model, kv_heads, mask, target):
    """In training SDPA becomes flagtree::attention before aot_autograd (training_attention.py):
    the forward graph holds one ft.attention with its lse, the backward one ft.attention_grad,
    nothing falls back in the importer, and gradients agree with fp64.  The interpret backend
    runs both on the Triton kernels, the cpu backend the forward on its kernel and the
    backward through torch's CPU flash-attention backward."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(2, 4, 5, 8), (2, kv_heads, 7, 8), (2, kv_heads, 7, 8)]
    inputs = [_random(s, torch.float32, generator).requires_grad_() for s in shapes]
    twins = [t.detach().double().requires_grad_() for t in inputs]
    extra = () if mask is None else (mask,)
    weights = torch.randn(2, 4, 5, 8, generator=generator, dtype=torch.float64)
    flagtree.clear_reports()
    compiled = torch.compile(model, backend="flagtree", options={"target": target})
    (compiled(*inputs, *extra) * weights.float()).sum().backward()
    (model(*twins, *(m.double() for m in extra)) * weights).sum().backward()
    for name_, actual, twin in zip("qkv", inputs, twins):
        assert_matches_fp64(actual.grad, twin.grad, torch.float32, f"{name}: gradient of {name_}")
    forward, backward = sorted(flagtree.reports(), key=lambda r: r.graph.endswith("backward"))
    assert forward.fusions == {"attention": 1} and backward.fusions == {"attention_grad": 1}
    assert forward.fallbacks == {} and backward.fallbacks == {}
    kernel_fallbacks = sorted(op.split(" ")[0] for r in (forward, backward) for op in r.kernel_fallbacks)
    assert kernel_fallbacks == []


class CausalAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("case", ["rank-3", "dynamic"])
def test_training_fuses_rank3_inputs_and_run_time_scales(case):
    """Rank-3 q, k, v (lifted to rank 4 first) and dynamic shapes, where the default scale
    1/sqrt(Dqk) of a symbolic head dim is known only at run time (q is scaled, and its gradient
    by the same), both train through ft.attention and ft.attention_grad; one compile serves
    every length and head dim, and gradients match fp64."""
    generator = torch.Generator().manual_seed(6)
    compiled = torch.compile(CausalAttention(), backend="flagtree", options={"target": "interpret"},
                             dynamic=case == "dynamic")
    flagtree.clear_reports()
    shapes = [(2, 9, 8)] if case == "rank-3" else [(1, 2, 9, 8), (1, 2, 13, 8), (1, 2, 7, 16)]
    for shape in shapes:
        inputs = [_random(shape, torch.float32, generator).requires_grad_() for _ in range(3)]
        twins = [t.detach().double().requires_grad_() for t in inputs]
        weights = torch.randn(shape, generator=generator, dtype=torch.float64)
        (compiled(*inputs) * weights.float()).sum().backward()
        (CausalAttention()(*twins) * weights).sum().backward()
        for name, actual, twin in zip("qkv", inputs, twins):
            assert_matches_fp64(actual.grad, twin.grad, torch.float32, f"{case} {shape}: gradient of {name}")
    forward, backward = sorted(flagtree.reports(), key=lambda r: r.graph.endswith("backward"))
    assert forward.fusions.get("attention") == 1 and backward.fusions.get("attention_grad") == 1
    assert forward.fallbacks == {} and backward.fallbacks == {}


def test_training_with_dropout_keeps_torchs_kernels_counted():
    """dropout_p > 0 is not routed to flagtree::attention: torch's fused kernel and its
    backward stay, as counted ft.torch_calls."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (_random((2, 4, n, 8), torch.float32, generator).requires_grad_() for n in (5, 7, 7))
    flagtree.clear_reports()
    torch.compile(Attention(dropout_p=0.3), backend="flagtree")(q, k, v).sum().backward()
    assert all("attention" not in r.fusions and "attention_grad" not in r.fusions for r in flagtree.reports())
    assert any(r.fallbacks for r in flagtree.reports())


def test_dropout_is_left_to_torchs_decomposition_and_matches_eager_for_the_same_seed():
    """dropout_p > 0 sends CPU SDPA to its math form, decomposed before import: no ft.attention,
    and the dropout mask comes from torch's generator (a documented fallback)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (_random((2, 4, n, 8), torch.float32, generator) for n in (5, 7, 7))
    model = Attention(dropout_p=0.3)
    flagtree.clear_reports()
    compiled = torch.compile(model, backend="flagtree", options={"target": "reference"})
    torch.manual_seed(4)
    expected = model(q, k, v)
    torch.manual_seed(4)
    torch.testing.assert_close(compiled(q, k, v), expected)
    (report,) = flagtree.reports()
    assert "attention" not in report.fusions and set(report.fallbacks) == {"aten.native_dropout.default"}


class HeadDimScaledAttention(torch.nn.Module):
    """SDPA with a scale computed from the head dim: a SymFloat under dynamic shapes."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=0.5 / math.sqrt(q.size(-1)))


# name → (model, KV heads, a float mask input, causal)
_DYNAMIC_CASES = {
    "causal-gqa": (Attention(is_causal=True, enable_gqa=True), 2, False, True),
    "float-mask": (Attention(), 4, True, False),
    "scale-from-head-dim": (HeadDimScaledAttention(), 4, False, False),
}


@pytest.mark.parametrize("name", list(_DYNAMIC_CASES))
def test_a_second_sequence_length_runs_the_same_attention(name):
    """dynamic=True: symbolic sequence lengths and head dim (a default or SymFloat scale is then
    applied to q at run time); new lengths reuse the one compiled graph."""
    model, kv_heads, with_mask, causal = _DYNAMIC_CASES[name]
    calls: list = []
    flagtree.clear_reports()
    compiled = torch.compile(model, backend=counting_flagtree(calls), dynamic=True, options={"target": "reference"})
    compiles = []
    for q_len, kv_len in ((8, 13), (13, 21)):
        generator = torch.Generator().manual_seed(q_len)
        q = _random((2, 4, q_len, 16), torch.float32, generator)
        k, v = (_random((2, kv_heads, kv_len, 16), torch.float32, generator) for _ in "kv")
        mask = (_random((q_len, kv_len), torch.float32, generator),) if with_mask else ()
        visible = torch.ones(q_len, kv_len, dtype=torch.bool)
        case = Case(model, (q, k, v, *mask), torch.tril(visible) if causal else visible)
        with torch.no_grad():
            assert_matches_on_defined_rows(compiled(*case.inputs), case, f"lengths {q_len}, {kv_len}")
        compiles.append(len(calls))
    assert compiles[0] == compiles[1], "a new sequence length recompiled"
    assert_one_attention_and_no_fallback()


# --------------------------------------------------------------------------- the CUDA kernels' ops


def _visible_reference(q, k, v, scale, visible, bias=None):
    """fp64 eager SDPA with an explicit visibility mask (and an additive bias)."""
    mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = mask + bias.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


# Each spelling called with is_causal (or custom_mask_type) set on Sq=5 < Skv=9, and the alignment
# its CUDA kernel gives (read off each kernel on an H200: flash and custom_mask_type 2 align to the
# bottom right, the others to the top left).
_CUDA_SPELLINGS = {
    "flash": (lambda q, k, v, b: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=0.3)[0],
              "lower_right", False),
    "efficient": (lambda q, k, v, b: aten._scaled_dot_product_efficient_attention(
        q, k, v, b, False, 0.0, True, scale=0.3)[0], "upper_left", True),
    "cudnn": (lambda q, k, v, b: aten._scaled_dot_product_cudnn_attention(q, k, v, b, False, 0.0, True, scale=0.3)[0],
              "upper_left", True),
    "overrideable": (lambda q, k, v, b: aten._scaled_dot_product_fused_attention_overrideable(
        q, k, v, b, 0.0, True, scale=0.3)[0], "upper_left", True),
    "efficient_forward": (lambda q, k, v, b: _bshd(aten._efficient_attention_forward(
        _bshd(q), _bshd(k), _bshd(v), b, None, None, None, None, 0.0, 2, scale=0.3)[0]), "lower_right", True),
}


@pytest.mark.parametrize("spelling", list(_CUDA_SPELLINGS))
def test_the_cuda_kernels_aten_ops_map_to_attention_by_their_schemas(spelling):
    """Traced on CPU tensors (their meta kernels give the shapes), each op becomes one
    ft.attention with its kernel's causal alignment, its bias as the mask, GQA heads kept."""
    call, causal, takes_bias = _CUDA_SPELLINGS[spelling]
    generator = torch.Generator().manual_seed(5)
    q = _random((2, 4, 5, 8), torch.float32, generator)
    k, v = (_random((2, 4, 9, 8), torch.float32, generator) for _ in "kv")
    inputs = [q, k, v] + ([_random((2, 4, 5, 9), torch.float32, generator)] if takes_bias else [])
    imported = import_function((lambda *a: call(*a)) if takes_bias else (lambda *a: call(*a, None)), *inputs)
    assert not imported.fallbacks
    (attention,) = [op for op in imported.module.walk() if op.name == "ft.attention"]
    assert attention.attributes["causal"] == causal and attention.attributes["has_mask"] == takes_bias
    (out,) = run_imported(imported, inputs)
    bias = inputs[3] if takes_bias else None
    offset = 0 if causal == "upper_left" else 9 - 5
    visible = torch.tril(torch.ones(5, 9, dtype=torch.bool), diagonal=offset)
    assert_matches_fp64(out, _visible_reference(q, k, v, 0.3, visible, bias), torch.float32, spelling)


def test_a_used_logsumexp_or_dropout_keeps_the_kernel_as_a_counted_torch_call():
    generator = torch.Generator().manual_seed(6)
    q, k, v = (_random((1, 2, 4, 8), torch.float32, generator) for _ in "qkv")
    with_lse = import_function(lambda *a: aten._scaled_dot_product_flash_attention_for_cpu(*a), q, k, v)
    assert with_lse.fallback_reasons == {ATTENTION: "its logsumexp feeds the backward pass"}
    for actual, expected in zip(run_imported(with_lse, [q, k, v]),
                                aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)):
        torch.testing.assert_close(actual, expected)
    dropout = import_function(
        lambda *a: aten._scaled_dot_product_efficient_attention(*a, None, False, 0.5)[0], q, k, v)
    (reason,) = dropout.fallback_reasons.values()
    assert reason.startswith("dropout (p=0.5)")
    assert not [op for op in dropout.module.walk() if op.name == "ft.attention"]

