"""Attention training: `ft.attention_grad`'s reference against autograd, the Triton backward
kernels (run by Triton's interpreter) against fp64 gradients on fresh random problems (the
forward kernels' problems of tests/attention_problems.py, without sinks), and compiling the
kernels for sm_90 without a GPU.  Tolerances as for the forward: relative L2 error within the
dtype's bound, or four times eager f32's own error.  With logits of ~1e3 the gradients are sums
that cancel to almost nothing, so there the error is measured against the size of the terms
summed (`magnitudes`): p and grad_s are rounded to the input type before their products (as
matrix units read them), sums are f32, and p is recomputed as exp(s − lse), where an f32 ulp of
a logit of 1e3 is ~1e-4 of its weight."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.backends.interpret import InterpretBackend
from flagtree.backends.triton import attention_backward
from flagtree.backends.triton.attention import FlashAttention, chunk_count, dtype_name, power_of_two_at_least
from flagtree.backends.triton.attention_backward import (
    BackwardClass,
    BackwardConfig,
    FlashAttentionBackward,
    backward_candidates,
    backward_fits,
    head_split_count,
)
from flagtree.ir import Builder, Module, Operation, new_function, parse_type, verify
from flagtree.ir.ops.attention import attention_grad_reference, attention_reference
from tests.attention_problems import TOLERANCE, Problem, attributes, make_inputs, problems, relative_error, sees_no_key
from tests.test_attention_kernel import HOPPER
from tests.triton_sm90 import CompileForSm90


@pytest.fixture(scope="module")
def backend() -> InterpretBackend:
    return InterpretBackend()


@pytest.fixture(scope="module")
def forward(backend) -> FlashAttention:
    return FlashAttention(backend.name, backend.jit, backend.capabilities())


@pytest.fixture(scope="module")
def backward(backend) -> FlashAttentionBackward:
    return FlashAttentionBackward(backend.name, backend.jit, backend.capabilities())


def training_problem(p: Problem) -> tuple[list[torch.Tensor | None], float, torch.Tensor]:
    """q, k, v, mask (no sinks), the scale, and a random output gradient."""
    (q, k, v, mask, _), scale = make_inputs(dataclasses.replace(p, sinks=False))
    generator = torch.Generator().manual_seed(p.seed + 1)
    grad_out = torch.randn(*q.shape[:3], v.shape[3], generator=generator).to(p.dtype)
    return [q, k, v, mask], scale, grad_out


def exact_gradients(inputs: list[torch.Tensor | None], attrs: dict, grad_out: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """ft.attention_grad's reference, every float tensor in `dtype`, with the forward's out and
    lse computed in that type too."""
    args = [t.to(dtype) if t.is_floating_point() else t for t in inputs if t is not None]
    out, lse = attention_reference(args, {**attrs, "with_lse": True}, [])
    return attention_grad_reference([*args[:3], out, grad_out.to(dtype), lse, *args[3:]], attrs, [])


def magnitudes(inputs: list[torch.Tensor | None], attrs: dict, grad_out: torch.Tensor,
               exact: tuple[torch.Tensor, ...]) -> list[float]:
    """Per gradient, relative to its norm: the size of the terms its sum adds up, which bounds
    what rounding them moves it (first order): grad_q = scale·Σ_j p_j (grad_out·v_j − D) k_j with
    |D| ≤ Σ|grad_out||out|, and kin.  A one-hot row (large logits) makes grad_q a sum of such
    terms that cancels to almost 0.  p is the reference's attention over identity values."""
    q, k, v, mask = (t.double() if t is not None and t.is_floating_point() else t for t in inputs)
    group = q.shape[1] // k.shape[1]
    identity = torch.eye(k.shape[2], dtype=torch.float64).expand(k.shape[0], k.shape[1], -1, -1)
    p = attention_reference([q, k, identity, *([mask] if mask is not None else [])], attrs, [])
    g = grad_out.double().abs()
    v_heads, k_heads = v.repeat_interleave(group, 1).abs(), k.repeat_interleave(group, 1).abs()
    out = torch.matmul(p, v_heads)
    weight = p * (torch.matmul(g, v_heads.transpose(-1, -2)) + (g * out).sum(-1, keepdim=True))
    terms = [attrs["scale"] * torch.matmul(weight, k_heads),
             attrs["scale"] * torch.matmul(weight.transpose(-1, -2), q.abs()),
             torch.matmul(p.transpose(-1, -2), g)]
    return [t.norm().item() / max(e.norm().item(), 1e-300) for t, e in zip(terms, exact)]


@settings(max_examples=30, deadline=None)
@given(problems())
def test_grad_reference_is_autograds_gradient_of_the_reference(problem):
    """In f64, attention_grad from the forward's lse equals autograd through attention_reference
    (visible keys, masks, GQA sums, rows that see nothing: zero gradient, no NaN)."""
    inputs, scale, grad_out = training_problem(problem)
    attrs = attributes(dataclasses.replace(problem, sinks=False), scale)
    leaves = [t.double().requires_grad_() for t in inputs[:3]]
    mask = [inputs[3].double() if inputs[3].is_floating_point() else inputs[3]] if inputs[3] is not None else []
    out = attention_reference([*leaves, *mask], attrs, [])
    expected = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    actual = exact_gradients(inputs, attrs, grad_out, torch.float64)
    for name, a, e in zip("qkv", actual, expected):
        e = torch.zeros_like(a) if e is None else e
        assert not a.isnan().any()
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * (1 + e.abs().max().item()), msg=name)


@settings(max_examples=40, deadline=None)
@given(problems(), st.booleans())
def test_backward_kernels_match_fp64_gradients(forward, backward, problem, split_heads):
    """The forward kernel's out and lse, then the backward kernels: grad_q, grad_k, grad_v within
    tolerance of fp64; rows that see no key get an exactly zero grad_q.  split_heads: the KV
    kernel splits GQA groups across programs (f32 partial sums); the problem's path picks the
    looped or the one-block Q kernel."""
    inputs, scale, grad_out = training_problem(problem)
    q, k, v, mask = inputs
    p = dataclasses.replace(problem, sinks=False)
    attrs = attributes(p, scale)
    kwargs = {"scale": scale, "causal": p.causal, "window": p.window}
    out, lse = forward(q, k, v, mask, None, **kwargs, with_lse=True)
    group = q.shape[1] // k.shape[1]
    splits = 2 if split_heads and group % 2 == 0 else None
    grads = backward(q, k, v, out, grad_out, lse, mask, **kwargs, head_splits=splits,
                     configs=forced_configs(backward.caps, p, q, k, v, mask))
    expected = exact_gradients(inputs, attrs, grad_out, torch.float64)
    eager = exact_gradients(inputs, attrs, grad_out, torch.float32)
    largest_logit = (torch.matmul(q.double(), k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale).abs()
    largest_logit = largest_logit.max().item() if largest_logit.numel() else 0.0
    # large logits: rounding p and grad_s to the input type, f32 sums, and p recomputed from lse
    per_magnitude = 2 * torch.finfo(p.dtype).eps + 8 * torch.finfo(torch.float32).eps * (1 + largest_logit)
    scales = magnitudes(inputs, attrs, grad_out, expected) if p.logit_scale > 1 else [0.0] * 3
    for name, actual, exact, f32, like, size in zip("qkv", grads, expected, eager, (q, k, v), scales):
        assert actual.shape == like.shape and actual.dtype == like.dtype and not actual.isnan().any()
        error, eager_error = relative_error(actual, exact), relative_error(f32.to(p.dtype), exact)
        assert error <= max(TOLERANCE[p.dtype], 4 * eager_error, per_magnitude * size), \
            f"{p}: grad_{name} error {error:.2e} (eager {eager_error:.2e})"
    assert (grads[0][sees_no_key(p, mask)] == 0).all()


def test_long_sequences_cross_every_block_phase(forward, backward):
    """Lengths 2^k+17 with causal (both alignments), a window and GQA: the kernels' diagonal,
    whole-block and edge phases all run."""
    for sq, skv, causal, window, heads in ((273, 273, "upper_left", 0, (4, 2)), (145, 273, "lower_right", 70, (4, 1)),
                                           (273, 145, "upper_left", 0, (2, 2))):
        p = Problem(1, heads, sq, skv, (32, 16), torch.float32, causal, window, "none", (True,) * 4, False, False,
                    1.0, "default", seed=sq + skv)
        inputs, scale, grad_out = training_problem(p)
        q, k, v, _ = inputs
        kwargs = {"scale": scale, "causal": causal, "window": window}
        out, lse = forward(q, k, v, None, None, **kwargs, with_lse=True)
        grads = backward(q, k, v, out, grad_out, lse, None, **kwargs)
        for actual, exact in zip(grads, exact_gradients(inputs, attributes(p, scale), grad_out, torch.float64)):
            assert relative_error(actual, exact) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sink_gradients_match_fp64(forward, backward, dtype):
    """With sinks (one of them -inf: it adds nothing, and gets gradient 0), GQA and rows that
    see no key (lower_right, Sq > Skv): grad_sinks = −Σ exp(sink − lse)·D from the kernels' lse
    and D, beside the q, k, v gradients."""
    p = Problem(2, (4, 2), 21, 13, (32, 16), dtype, "lower_right", 0, "none", (True,) * 4, True, False, 1.0,
                "default", seed=9)
    (q, k, v, _, _), scale = make_inputs(p)
    sinks = torch.tensor([0.5, float("-inf"), -1.0, 2.0])
    grad_out = torch.randn(2, 4, 21, 16, generator=torch.Generator().manual_seed(10)).to(dtype)
    kwargs = {"scale": scale, "causal": "lower_right", "window": 0}
    out, lse = forward(q, k, v, None, sinks, **kwargs, with_lse=True)
    grads = backward(q, k, v, out, grad_out, lse, None, sinks, **kwargs)
    attrs = {**kwargs, "has_mask": False, "has_sinks": True}
    args = [t.double() for t in (q, k, v, sinks)]
    exact_out, exact_lse = attention_reference(args, {**attrs, "with_lse": True}, [])
    expected = attention_grad_reference([*args[:3], exact_out, grad_out.double(), exact_lse, args[3]], attrs, [])
    assert len(grads) == 4 and grads[3].dtype == sinks.dtype and grads[3][1] == 0
    for name, actual, exact in zip(("q", "k", "v", "sinks"), grads, expected):
        assert relative_error(actual, exact) <= TOLERANCE[dtype], f"grad_{name}"


def test_deepseek_v4_head_dim_512_mqa_window_sinks(backend):
    """64 query heads of dim 512 over one KV head, window 4, sinks: the kernels with an
    H200's tiles (the interpreter's 48 KiB of shared memory fit none at this head dim, so
    there the op runs its reference), the group split across programs, against fp64."""
    from tests.test_attention_kernel import HOPPER

    generator = torch.Generator().manual_seed(12)
    q = torch.randn(1, 64, 9, 512, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(1, 1, 12, 512, generator=generator).to(torch.bfloat16) for _ in range(2))
    sinks = torch.randn(64, generator=generator)
    grad_out = torch.randn(1, 64, 9, 512, generator=generator).to(torch.bfloat16)
    kwargs = {"scale": 512 ** -0.5, "causal": "lower_right", "window": 4}
    attrs = {**kwargs, "has_mask": False, "has_sinks": True}
    args = [t.double() for t in (q, k, v, sinks)]
    exact_out, exact_lse = attention_reference(args, {**attrs, "with_lse": True}, [])
    out, lse = exact_out.to(torch.bfloat16), exact_lse.float()
    hopper_sized = FlashAttentionBackward(backend.name, backend.jit, HOPPER)
    grads = hopper_sized(q, k, v, out, grad_out, lse, None, sinks, **kwargs, head_splits=8)
    expected = attention_grad_reference([*args[:3], exact_out, grad_out.double(), exact_lse, args[3]], attrs, [])
    for name, actual, exact in zip(("q", "k", "v", "sinks"), grads, expected):
        assert relative_error(actual, exact) <= TOLERANCE[torch.bfloat16], f"grad_{name}"


# ---------------------------------------------------------------------------- compiled modules
def training_module(dqk: int = 32, window: int = 8, causal: str = "lower_right", sinks: bool = False) -> Module:
    """ft.attention with its lse, then ft.attention_grad, as a forward and backward graph would."""
    module = Module.empty()
    types = [f"tensor<2x4x17x{dqk}xbf16>", f"tensor<2x2x33x{dqk}xbf16>", "tensor<2x2x33x32xbf16>",
             "tensor<2x4x17x32xbf16>", "tensor<2x1x17x33xi1>", *(["tensor<4xf32>"] if sinks else [])]
    _, block = new_function(module, "main", [parse_type(t) for t in types])
    q, k, v, grad_out, mask, *sink_args = block.args
    attrs = {"scale": 0.125, "causal": causal, "window": window, "has_mask": True, "has_sinks": sinks}
    builder = Builder(block)
    forward = builder.create("ft.attention", [q, k, v, mask, *sink_args], {**attrs, "with_lse": True})
    out, lse = forward.results
    grads = builder.create("ft.attention_grad", [q, k, v, out, grad_out, lse, mask, *sink_args], attrs).results
    block.append(Operation("func.return", [out, *grads]))
    verify(module)
    return module


def test_compiled_training_module_launches_both_kernels(backend):
    plan = backend.compile(training_module(dqk=64), backend.capabilities())
    assert not plan.fallback_ops
    assert "with_lse=True)" in plan.source and "= flash_attention_backward(" in plan.source
    generator = torch.Generator().manual_seed(11)
    inputs = [torch.randn(*shape, generator=generator).bfloat16()
              for shape in ((2, 4, 17, 64), (2, 2, 33, 64), (2, 2, 33, 32), (2, 4, 17, 32))]
    mask = torch.rand(2, 1, 17, 33, generator=generator) < 0.8
    _, *grads = plan(*inputs, mask)
    attrs = {"scale": 0.125, "causal": "lower_right", "window": 8, "has_mask": True, "has_sinks": False}
    expected = exact_gradients([*inputs[:3], mask], attrs, inputs[3], torch.float64)
    for actual, exact in zip(grads, expected):
        assert relative_error(actual, exact) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(("dqk", "window", "causal", "sinks"), [
    (32, 0, "upper_left", False), (32, 8, "lower_right", True), (32, 0, "lower_right", False),
    (64, 0, "upper_left", True)])
def test_the_cpu_backend_calls_torchs_flash_backward_where_it_applies(dqk, window, causal, sinks):
    """The cpu backend runs the forward (with its lse) on its own kernel and the backward
    through torch's CPU flash-attention backward, matching fp64 (GQA, a bool mask with a fully
    hidden row): a window and a lower-right diagonal with Sq ≠ Skv join the mask, sinks get
    their gradient from the lse; unequal qk and v head dims (which that kernel lacks) run the
    reference, counted."""
    from flagtree.backends.cpu import CpuBackend

    backend = CpuBackend()
    generator = torch.Generator().manual_seed(13)
    plan = backend.compile(training_module(dqk, window, causal, sinks), backend.capabilities())
    assert [name.split(" ")[0] for name in plan.fallback_ops] == ([] if dqk == 32 else ["ft.attention_grad"])
    inputs = [torch.randn(*shape, generator=generator).bfloat16()
              for shape in ((2, 4, 17, dqk), (2, 2, 33, dqk), (2, 2, 33, 32), (2, 4, 17, 32))]
    mask = torch.rand(2, 1, 17, 33, generator=generator) < 0.8
    mask[:, :, 3] = False
    sink_args = [torch.tensor([0.5, float("-inf"), -1.0, 2.0])] if sinks else []
    _, *grads = plan(*inputs, mask, *sink_args)
    attrs = {"scale": 0.125, "causal": causal, "window": window, "has_mask": True, "has_sinks": sinks}
    expected = exact_gradients([*inputs[:3], mask, *sink_args], attrs, inputs[3], torch.float64)
    assert len(grads) == len(expected) == 3 + sinks
    for actual, exact in zip(grads, expected):
        assert not actual.isnan().any() and relative_error(actual, exact) <= TOLERANCE[torch.bfloat16]


# ----------------------------------------------------------------------------------- configs
def backward_shape(kernel: str, dqk: int = 128, dv: int = 128, dtype: str = "bf16") -> BackwardClass:
    return BackwardClass(kernel, dtype, dqk, dv, True, False, False, 1, 4096, 4096)


@pytest.mark.parametrize("caps", [InterpretBackend().capabilities(), HOPPER])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128), (256, 256)])
def test_backward_candidates_fit_the_target(caps, dims):
    """Every candidate fits; only f32 at head dims 256/256 (64 KiB for 32 rows of q, k, v and
    grad_out) has none in 48 KiB of shared memory, and the lowering then falls back."""
    for kernel in ("kv", "q"):
        for dtype in ("bf16", "f32"):
            shape = backward_shape(kernel, *dims, dtype=dtype)
            candidates = backward_candidates(shape, caps)
            assert all(backward_fits(c, shape, caps) for c in candidates)
            too_big = dtype == "f32" and dims == (256, 256) and caps.shared_memory_bytes < 64 * 1024
            assert bool(candidates) != too_big


def test_mqa_splits_the_group_until_the_gpu_is_full():
    """DeepSeek-V4's one KV head over 64 query heads at 4096 keys: 32 key blocks alone would
    leave most of 132 multiprocessors idle, so the group is split; multi-head attention is not."""
    assert head_split_count(programs=32, group=64, caps=HOPPER) == 8
    assert head_split_count(programs=32 * 16, group=1, caps=HOPPER) == 1
    assert head_split_count(programs=32, group=3, caps=HOPPER) == 1


def test_backward_kernels_compile_for_sm90_with_tensor_cores():
    """Causal bf16 at head dim 128 and MLA's 192/128 with a bool mask: the Q and KV kernels
    compile for Hopper with their dots on wgmma; and DeepSeek-V4's 512 with a window and sinks."""
    CompileForSm90.compiled.clear()
    backward = FlashAttentionBackward("sm90-compile-check", CompileForSm90, HOPPER)
    for dqk, dv, mask in ((128, 128, None), (192, 128, torch.empty(1, 1, 256, 256, dtype=torch.bool))):
        q, k = torch.empty(1, 4, 256, dqk, dtype=torch.bfloat16), torch.empty(1, 2, 256, dqk, dtype=torch.bfloat16)
        v, out = torch.empty(1, 2, 256, dv, dtype=torch.bfloat16), torch.empty(1, 4, 256, dv, dtype=torch.bfloat16)
        lse = torch.empty(1, 4, 256)
        backward._chosen.update({backward_shape_of(q, k, v, mask, kernel): BackwardConfig(*tiles)
                                 for kernel, tiles in (("kv", (32, 128, 8, 3)), ("q", (128, 64, 8, 3)))})
        backward(q, k, v, out, out, lse, mask, scale=0.1, causal="upper_left", window=0)
    assert len(CompileForSm90.compiled) == 4
    assert all("wgmma.mma_async" in c.asm["ptx"] for c in CompileForSm90.compiled)
    q, kv = torch.empty(1, 64, 256, 512, dtype=torch.bfloat16), torch.empty(1, 1, 256, 512, dtype=torch.bfloat16)
    shapes = [backward_shape_of(q, kv, kv, None, kernel, "lower_right", 128) for kernel in ("kv", "q")]
    backward._chosen.update({shape: backward_candidates(shape, HOPPER)[0] for shape in shapes})
    assert backward._chosen[shapes[1]].dim_chunk  # V4's window lets the one-block Q kernel hold every key
    backward(q, kv, kv, q, q, torch.empty(1, 64, 256), None, torch.empty(64), scale=0.1, causal="lower_right",
             window=128)
    assert len(CompileForSm90.compiled) == 6  # DeepSeek-V4's head dim 512 compiles too
    assert "wgmma.mma_async" in CompileForSm90.compiled[4].asm["ptx"]  # the one-block Q kernel


def backward_shape_of(q, k, v, mask, kernel: str, causal: str = "upper_left", window: int = 0) -> BackwardClass:
    return BackwardClass(kernel, dtype_name(q.dtype), q.shape[3], v.shape[3], causal != "none", window > 0,
                         mask is not None, q.shape[1] // k.shape[1], power_of_two_at_least(q.shape[2]),
                         power_of_two_at_least(k.shape[2]), window)


def forced_configs(caps, p: Problem, q, k, v, mask) -> tuple[BackwardConfig, BackwardConfig] | None:
    """The problem's path applied to the Q kernel: "one_block" the one-block kernel (where a
    window lets it hold every key a tile sees), "online" the looped one; else the tuned choice."""
    if p.path not in ("one_block", "online"):
        return None
    q_shape, kv_shape = (backward_shape_of(q, k, v, mask, kernel, p.causal, p.window) for kernel in ("q", "kv"))
    wanted = [c for c in backward_candidates(q_shape, caps) if bool(c.dim_chunk) == (p.path == "one_block")]
    return (wanted[0], backward_candidates(kv_shape, caps)[0]) if wanted else None


def test_each_call_signature_is_planned_once(backend, forward):
    """Calls alternating between two lengths reuse one plan per signature, and give bit for bit
    what a fresh backward object gives (nothing of the first call's tensors leaks into the next)."""
    backward = FlashAttentionBackward(backend.name, backend.jit, backend.capabilities())
    kwargs = {"scale": 0.3, "causal": "upper_left", "window": 0}
    for length, seed in ((20, 1), (33, 2), (20, 3)):
        generator = torch.Generator().manual_seed(seed)
        q, k, v, grad_out = (torch.randn(1, 2, length, 16, generator=generator) for _ in range(4))
        out, lse = forward(q, k, v, None, None, **kwargs, with_lse=True)
        grads = backward(q, k, v, out, grad_out, lse, **kwargs)
        fresh = FlashAttentionBackward(backend.name, backend.jit, backend.capabilities())(q, k, v, out, grad_out, lse,
                                                                                           **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(grads, fresh))
    assert len(backward._plans) == 2


@pytest.mark.parametrize("chunk", [1, 2, 3, 16])
def test_program_order_does_not_change_the_gradients(backend, forward, chunk):
    """The kernels walk batch·head indices in chunks (attention_kernel._tile): any chunk size,
    dividing the indices or not, gives bit for bit the gradients of the whole-grid order."""
    generator = torch.Generator().manual_seed(chunk)
    q, grad_out = (torch.randn(2, 4, 40, 16, generator=generator) for _ in range(2))
    k, v = (torch.randn(2, 2, 40, 16, generator=generator) for _ in range(2))
    kwargs = {"scale": 0.25, "causal": "upper_left", "window": 0}
    out, lse = forward(q, k, v, None, None, **kwargs, with_lse=True)
    whole_grid = FlashAttentionBackward(backend.name, backend.jit, backend.capabilities())
    expected = whole_grid(q, k, v, out, grad_out, lse, **kwargs)
    with mock.patch.object(attention_backward, "chunk_count", lambda _bytes, indices, _caps: min(chunk, indices)):
        chunked = FlashAttentionBackward(backend.name, backend.jit, backend.capabilities())
        grads = chunked(q, k, v, out, grad_out, lse, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


def test_chunks_cover_the_grid_when_its_operands_fit_in_l2():
    """All indices in one chunk when what they stream fits in most of L2; else chunks of about an
    eighth of it, at least one index, at most all of them."""
    l2 = dict(HOPPER.extra)["l2_bytes"]
    assert chunk_count(2**20, 16, HOPPER) == 16
    assert chunk_count(l2, 16, HOPPER) == 1
    assert chunk_count(l2 // 16, 64, HOPPER) == 2
    assert chunk_count(10 * l2, 3, HOPPER) == 1
