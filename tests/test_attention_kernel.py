"""The Triton flash-attention kernels (backends/triton/attention*.py), run by Triton's interpreter,
against an fp64 evaluation of ft.attention's reference (flagtree/ir/ops/attention.py).

Hypothesis draws fresh problems: batch, GQA/MQA head counts, query/key lengths such as 1 and
2^k+17, unequal qk/v head dims, causal kind, window, bool or additive masks (broadcast, with
fully masked rows), sinks, f32/bf16/f16, large logits, transposed (non-contiguous) q/k/v, and
which kernel path runs (the default configuration, the online kernel, the one-block kernel,
split-KV).  A result passes when its relative L2 error against fp64 is within DESIGN.md's
tolerance for its dtype — f32 1e-5 (f32 dot products and exp2, no rounding to a narrower
type), f16 2e-3 and bf16 1.6e-2 (the probabilities are rounded to the input type before the
p·v product, as matrix units read them, and the output is rounded once) — or within four
times the error of eager torch's own f32 evaluation of the same inputs (logits of ~1e3 are
ill-conditioned in any f32 evaluation: an ulp of a logit moves its weight by ~1e-4, and the
kernel's scores take one more rounding, the base-2 scale); it has no NaN, and rows that see no key and have no
sink are exactly 0.  Also: compiled FTIR modules (fallbacks counted), configurations chosen
from capabilities, the autotuner's memory, and compiling the kernels for sm_90 without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings

from flagtree.backends.base import Capabilities
from flagtree.backends.interpret import InterpretBackend
from flagtree.backends.triton.attention import (
    AttentionConfig,
    ConfigTuner,
    FlashAttention,
    attention_class,
    candidate_configs,
    fits,
)
from flagtree.ir import Builder, Module, Operation, new_function, parse_type, verify
from tests.attention_problems import (
    TOLERANCE,
    Problem,
    check,
    check_lse,
    make_inputs,
    problems,
    reference,
    relative_error,
)
from tests.triton_sm90 import CompileForSm90

HOPPER = Capabilities(target="cuda:sm_90", dtypes=frozenset({"f32", "f16", "bf16"}),
                      matrix_dtypes=frozenset({"f16", "bf16"}), shared_memory_bytes=227 * 1024, warp_size=32,
                      max_threads_per_block=1024, extra=(("l2_bytes", 50 * 2**20), ("multiprocessors", 132)))


@pytest.fixture(scope="module")
def backend() -> InterpretBackend:
    return InterpretBackend()


@pytest.fixture(scope="module")
def attention(backend) -> FlashAttention:
    return FlashAttention(backend.name, backend.jit, backend.capabilities())


def run_path(attention: FlashAttention, p: Problem, inputs, scale: float,
             with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's result (and lse) on the problem's path, or None when that path does not apply."""
    q, k, v, mask, sinks = inputs
    kwargs = {"scale": scale, "causal": p.causal, "window": p.window, "with_lse": with_lse}
    if p.path == "default":
        return attention(q, k, v, mask, sinks, **kwargs)
    candidates = candidate_configs(attention_class(q, k, v, p.causal, p.window, mask is not None), attention.caps)
    one_block = [c for c in candidates if c.dim_chunk]
    online = [c for c in candidates if not c.dim_chunk]
    if p.path == "one_block":
        if not one_block:
            return None
        return attention.run(q, k, v, mask, sinks, **kwargs, config=one_block[0])
    return attention.run(q, k, v, mask, sinks, **kwargs, config=online[0], splits=3 if p.path == "split" else 1)


# ------------------------------------------------------------------------------------ numerics
@settings(max_examples=60)
@given(problems())
def test_kernel_matches_fp64_reference(attention, problem):
    inputs, scale = make_inputs(problem)
    result = run_path(attention, problem, inputs, scale, with_lse=True)
    if result is not None:
        out, lse = result
        check(problem, out, inputs, scale)
        check_lse(problem, lse, inputs, scale)


@pytest.mark.parametrize("path", ["online", "one_block", "split"])
def test_rows_that_see_nothing_are_zero_and_sinks_absorb_the_rest(attention, path):
    """lower_right with Sq > Skv leaves the first rows without keys; a bool mask hides whole
    rows; an additive mask with -inf everywhere too.  Without sinks those rows are 0, with a
    sink every row's weights shrink by the sink's share (and hidden rows stay 0)."""
    for mask_kind in ("bool", "additive"):
        for sinks in (False, True):
            problem = Problem(1, (4, 2), 9, 5, (32, 32), torch.float32, "lower_right", 0, mask_kind,
                              (True, True, True, True), sinks, False, 1.0, path, seed=7)
            inputs, scale = make_inputs(problem)
            out = run_path(attention, problem, inputs, scale)
            check(problem, out, inputs, scale)
            assert (out[:, :, :4] == 0).all()  # rows 0-3 come before the first key


def test_deepseek_v4_shape_mqa_512_k_equals_v_window_sinks(attention):
    """64 query heads of dim 512 over one KV head that is both K and V (one tile load serves
    both), window 4, sinks: every kernel path."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 64, 9, 512, generator=generator).to(torch.bfloat16)
    kv = torch.randn(1, 1, 12, 512, generator=generator).to(torch.bfloat16)
    sinks = torch.randn(64, generator=generator)
    attrs = {"scale": 512 ** -0.5, "causal": "lower_right", "window": 4, "has_mask": False, "has_sinks": True}
    expected = reference([q, kv, kv, sinks], attrs, torch.float64)
    shape = attention_class(q, kv, kv, "lower_right", 4, False)
    assert shape.kv_shared
    configs = candidate_configs(shape, attention.caps)
    assert configs[0].dim_chunk, "the one-block kernel comes first for head dim 512"
    online = next(c for c in configs if not c.dim_chunk)
    kwargs = {"scale": attrs["scale"], "causal": "lower_right", "window": 4}
    for out in (attention.run(q, kv, kv, None, sinks, **kwargs, config=configs[0]),
                attention.run(q, kv, kv, None, sinks, **kwargs, config=online),
                attention.run(q, kv, kv, None, sinks, **kwargs, config=online, splits=2)):
        assert relative_error(out, expected) <= TOLERANCE[torch.bfloat16]


def test_decode_splits_the_keys_and_merges_exactly(attention):
    """One query over 200 keys, GQA group 4: the online kernel split 1..5 ways and the one-block
    kernel taking 64 keys per program give the same result up to f32 rounding."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, s, 64, generator=generator) for h, s in ((8, 1), (2, 200), (2, 200)))
    sinks = torch.randn(8, generator=generator)
    attrs = {"scale": 0.125, "causal": "lower_right", "window": 0, "has_mask": False, "has_sinks": True}
    expected = reference([q, k, v, sinks], attrs, torch.float64)
    kwargs = {"scale": 0.125, "causal": "lower_right", "window": 0}
    for splits in range(1, 6):
        out = attention.run(q, k, v, None, sinks, **kwargs, config=AttentionConfig(16, 16, 4, 4, 2), splits=splits)
        assert relative_error(out, expected) <= TOLERANCE[torch.float32]
    out = attention.run(q, k, v, None, sinks, **kwargs, config=AttentionConfig(16, 64, 4, 4, 2, dim_chunk=32))
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------- compiled modules
def attention_module(types: list[str], **attrs) -> Module:
    module = Module.empty()
    _, block = new_function(module, "main", [parse_type(t) for t in types])
    result = Builder(block).value("ft.attention", *block.args, **attrs)
    block.append(Operation("func.return", [result]))
    verify(module)
    return module


def testcompiled_module_launches_the_kernel(backend):
    types = ["tensor<2x4x17x64xbf16>", "tensor<2x2x33x64xbf16>", "tensor<2x2x33x32xbf16>",
             "tensor<2x1x17x33xi1>", "tensor<4xf32>"]
    attrs = {"scale": 0.125, "causal": "lower_right", "window": 8, "has_mask": True, "has_sinks": True}
    plan = backend.compile(attention_module(types, **attrs), backend.capabilities())
    assert not plan.fallback_ops
    assert "= flash_attention(arg0, arg1, arg2, mask=arg3, sinks=arg4, scale=0.125, causal='lower_right', " \
           "window=8)" in plan.source
    generator = torch.Generator().manual_seed(11)
    inputs = [torch.randn(2, 4, 17, 64, generator=generator).bfloat16(),
              torch.randn(2, 2, 33, 64, generator=generator).bfloat16(),
              torch.randn(2, 2, 33, 32, generator=generator).bfloat16(),
              torch.rand(2, 1, 17, 33, generator=generator) < 0.8, torch.randn(4, generator=generator)]
    (out,) = plan(*inputs)
    assert relative_error(out, reference(inputs, attrs, torch.float64)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("types, reason", [
    (["tensor<1x2x5x16xf64>"] * 3, "f64"),
    (["tensor<1x2x5x640xf32>", "tensor<1x2x5x640xf32>", "tensor<1x2x5x64xf32>"], "at most 512"),
    (["tensor<1x2x5x?xf32>", "tensor<1x2x5x?xf32>", "tensor<1x2x5x16xf32>"], "static"),
])
def test_what_the_kernel_cannot_run_falls_back_counted(backend, types, reason):
    attrs = {"scale": 0.25, "causal": "none", "window": 0, "has_mask": False, "has_sinks": False}
    plan = backend.compile(attention_module(types, **attrs), backend.capabilities())
    (fallback,) = plan.fallback_ops
    assert fallback.startswith("ft.attention (") and reason in fallback
    inputs = [torch.randn([int(d) if d != "?" else 16 for d in t[7:-1].split("x")[:-1]],
                          dtype=torch.float64 if "f64" in t else torch.float32) for t in types]
    (out,) = plan(*inputs)
    torch.testing.assert_close(out, reference(inputs, attrs))


# ----------------------------------------------------------------------------------- configs
def attention_shape(dqk: int, dv: int, dtype=torch.bfloat16, sq=4096, skv=4096, heads=(16, 16), window=0,
                    shared=False):
    q = torch.empty(1, heads[0], sq, dqk, dtype=dtype)
    k = torch.empty(1, heads[1], skv, dqk, dtype=dtype)
    return attention_class(q, k, k if shared else torch.empty(1, heads[1], skv, dv, dtype=dtype),
                           "lower_right", window, False)


@pytest.mark.parametrize("caps", [InterpretBackend().capabilities(), HOPPER])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128), (512, 512)])
def test_candidates_fit_the_target(caps, dims):
    """Every candidate fits; only f32 at head dim 512 (≥ 64 KiB per 16-row tile and 16-key
    stage) has none in 48 KiB of shared memory, and the lowering then falls back."""
    for shape in (attention_shape(*dims), attention_shape(*dims, dtype=torch.float32),
                  attention_shape(*dims, heads=(64, 1), window=128, shared=dims[0] == dims[1])):
        candidates = candidate_configs(shape, caps)
        assert all(fits(c, shape, caps) for c in candidates)
        too_big = shape.dtype == "f32" and dims[0] == 512 and not shape.window and caps.shared_memory_bytes < 64 * 1024
        assert bool(candidates) != too_big


def test_configs_follow_capabilities():
    """48 KiB of shared memory (the interpreter's generic GPU) gets small tiles; an H200-class
    target the FlashAttention-2 tiles; V4's window packs the 64 heads of one position into the
    one-block kernel; decode never gets a tile taller than its rows."""
    small = candidate_configs(attention_shape(128, 128), InterpretBackend().capabilities())[0]
    assert small.block_m * small.block_n <= 64 * 32
    assert candidate_configs(attention_shape(128, 128), HOPPER)[0] == AttentionConfig(128, 64, 1, 8, 3)
    v4 = candidate_configs(attention_shape(512, 512, heads=(64, 1), window=128, shared=True), HOPPER)[0]
    assert (v4.dim_chunk, v4.pack, v4.block_m, v4.block_n) == (64, 64, 64, 128)
    decode = attention_shape(128, 128, sq=1, skv=65536, heads=(32, 8))
    assert all(c.block_m <= 16 for c in candidate_configs(decode, HOPPER))


def test_tuner_times_each_class_once_and_remembers_it_on_disk():
    shape = attention_shape(128, 128)
    candidates = candidate_configs(shape, HOPPER)
    timings = {c: 1.0 + i for i, c in enumerate(candidates)}
    fastest = candidates[3]
    timings[fastest] = 0.5
    measured = []

    def measure(launch):
        config = launch()
        measured.append(config)
        return timings[config]

    def prepare(config):
        return lambda: config

    tuner = ConfigTuner("test", HOPPER, measure)
    assert tuner.best(shape, candidates, prepare) == fastest
    assert tuner.best(shape, candidates, prepare) == fastest
    assert measured == candidates[:6]
    fresh = ConfigTuner("test", HOPPER, lambda launch: pytest.fail("a remembered class is timed again"))
    assert fresh.best(shape, candidates, prepare) == fastest
    other = dataclasses.replace(shape, causal=False)
    assert ConfigTuner("test", HOPPER, measure).best(other, candidates, prepare) == fastest
    assert len(measured) == 12


# ------------------------------------------------------------------------- GPU compilation
def test_kernels_compile_for_sm90_with_tensor_cores():
    """The online kernel (bf16, MLA head dims 192/128, causal), the one-block kernel (V4) and
    split-KV with its merge compile for Hopper, the dots on wgmma."""
    CompileForSm90.compiled.clear()
    attention = FlashAttention("sm90-compile-check", CompileForSm90, HOPPER)
    q = torch.empty(1, 8, 256, 192, dtype=torch.bfloat16)
    k = torch.empty(1, 8, 256, 192, dtype=torch.bfloat16)
    v = torch.empty(1, 8, 256, 128, dtype=torch.bfloat16)
    attention.run(q, k, v, None, None, scale=0.1, causal="lower_right", window=0,
                  config=AttentionConfig(128, 64, 1, 8, 3))
    q = torch.empty(1, 64, 16, 512, dtype=torch.bfloat16)
    kv = torch.empty(1, 1, 256, 512, dtype=torch.bfloat16)
    sinks = torch.empty(64)
    attention.run(q, kv, kv, None, sinks, scale=0.1, causal="lower_right", window=128,
                  config=AttentionConfig(64, 128, 64, 4, 3, 64))
    attention.run(q[:, :, :1], kv, kv, None, sinks, scale=0.1, causal="lower_right", window=0,
                  config=AttentionConfig(64, 64, 64, 8, 2), splits=2)
    assert len(CompileForSm90.compiled) == 4
    assert all("wgmma.mma_async" in c.asm["ptx"] for c in CompileForSm90.compiled[:3])
