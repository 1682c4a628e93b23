"""Generated Triton kernels, run by the `interpret` backend, against the reference backend.

Every test builds a function holding one `ft.fusion` region (as fuse-elementwise would),
compiles it to a launch plan with generated Triton kernels, runs it with Triton's
interpreter on CPU tensors, and compares with the reference backend, which runs the
region op by op with eager torch.  Tensors are small so the interpreter stays fast.
The last tests compile generated kernels for a real GPU target (sm_90) without a GPU,
exactly as `triton.jit` would at launch, to check that they compile and vectorise.
"""

from __future__ import annotations

import ast
import logging
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flagtree.passes.fuse_elementwise  # noqa: F401  (registers the pass)
from flagtree.backends.interpret import InterpretBackend
from flagtree.backends.reference import run_module
from flagtree.errors import FlagtreeError
from flagtree.ir import (
    Block,
    Builder,
    DenseAttr,
    Module,
    Region,
    Value,
    new_function,
    parse_type,
    verify,
)
from flagtree.passes import PassManager
from flagtree.runtime import cache_stats
from tests.strategies import (
    BF16_ROUNDING_TYPES,
    bf16_rounding_body,
    bf16_rounding_inputs,
    random_inputs,
    result_tolerances,
    runnable_modules,
    seeds,
)
from tests.triton_sm90 import CompileForSm90

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


pytestmark = pytest.mark.usefixtures("fresh_cache")  # each test: an empty cache, zeroed counters


@pytest.fixture(scope="module")
def backend():
    return InterpretBackend()


def fusion_module(arg_types: list[str], body, kind: str = "elementwise") -> Module:
    """`@main(args)` whose body is one ft.fusion region built by `body(builder, block_args)`."""
    module = Module.empty()
    types = [parse_type(t) for t in arg_types]
    _, block = new_function(module, "main", types)
    region_block = Block(types)
    results = body(Builder(region_block), region_block.args)
    Builder(region_block).create("ft.yield", results, result_types=[])
    fusion = Builder(block).create("ft.fusion", list(block.args), {"kind": kind}, regions=[Region([region_block])])
    Builder(block).create("func.return", fusion.results, result_types=[])
    verify(module)
    return module


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: float | None = None) -> None:
    """Same shape, dtype, NaN and inf positions; relative L2 error of the rest within
    `tolerance`, by default the dtype's (integers and booleans: equal)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if not actual.dtype.is_floating_point:
        assert torch.equal(actual, expected)
        return
    a, e = actual.double(), expected.double()
    assert torch.equal(a.isnan(), e.isnan()), "NaN positions differ"
    infinite = e.isinf()
    assert torch.equal(a[infinite], e[infinite]), "infinities differ"
    finite = ~(e.isnan() | infinite)
    # Norms of f64 values near the top of the range overflow: measure in units of the largest.
    unit = e[finite].abs().max().clamp_min(1e-300) if finite.any() else torch.tensor(1.0, dtype=torch.float64)
    error = torch.linalg.vector_norm((a[finite] - e[finite]) / unit)
    scale = torch.linalg.vector_norm(e[finite] / unit).clamp_min(1e-30)
    tolerance = TOLERANCE[actual.dtype] if tolerance is None else tolerance
    assert float(error / scale) <= tolerance, f"relative L2 error {float(error / scale):.3g} > {tolerance:g}"


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(actual.double() - truth) / torch.linalg.vector_norm(truth))


def run_both(backend, module: Module, args: list) -> list[torch.Tensor]:
    plan = backend.compile(module, backend.capabilities())
    actual = plan(*args)
    expected = run_module(module, args)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_matches(a, e)
    return actual


def constant(b: Builder, value: float, dtype: str = "f32") -> Value:
    torch_dtype = parse_type(dtype).torch_dtype
    return b.value("ft.constant", value=DenseAttr(torch.tensor(value, dtype=torch_dtype)),
                   result_type=parse_type(f"tensor<{dtype}>"))


def cast(b: Builder, x: Value, dtype: str) -> Value:
    return b.value("ft.cast", x, result_type=x.type.with_dtype(parse_type(dtype)))


# --- elementwise ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_elementwise_chain_with_broadcasting_and_casts(backend, dtype):
    def body(b, args):
        x, row, scalar = args
        y = b.value("ft.mul", b.value("ft.add", x, row), scalar)
        wide = cast(b, y, "f32")
        z = b.value("ft.sigmoid", b.value("ft.sub", wide, constant(b, 0.5)))
        return [cast(b, z, dtype), b.value("ft.gt", wide, constant(b, 0.0))]

    module = fusion_module([f"tensor<3x5x33x{dtype}>", f"tensor<33x{dtype}>", f"tensor<{dtype}>"], body)
    torch_dtype = parse_type(dtype).torch_dtype
    args = [torch.randn(3, 5, 33).to(torch_dtype), torch.randn(33).to(torch_dtype), torch.tensor(1.5).to(torch_dtype)]
    run_both(backend, module, args)


def test_non_contiguous_inputs(backend):
    def body(b, args):
        x, y, z = args
        return [b.value("ft.add", b.value("ft.mul", x, y), z)]

    module = fusion_module(["tensor<6x7xf32>"] * 3, body)
    base = torch.randn(7, 6)
    args = [base.t(), torch.randn(6, 14)[:, ::2], torch.randn(6, 1).expand(6, 7)]
    assert not any(a.is_contiguous() for a in args)
    run_both(backend, module, args)


def test_views_fold_into_index_math(backend):
    """transpose, broadcast_to, reshape (split and merge), slices with steps 1 and 2."""

    def body(b, args):
        x, col = args  # x: 4x8, col: 4
        t = b.value("ft.transpose", x, perm=(1, 0))  # 8x4
        split = b.value("ft.reshape", t, result_type=parse_type("tensor<2x4x4xf32>"))
        merged = b.value("ft.reshape", split, result_type=parse_type("tensor<8x4xf32>"))
        odd_rows = b.value("ft.slice", t, dim=0, start=1, end=8, step=2)  # 4x4
        first_rows = b.value("ft.slice", merged, dim=0, start=0, end=4, step=1)  # 4x4
        wide = b.value("ft.broadcast_to", b.value("ft.reshape", col, result_type=parse_type("tensor<4x1xf32>")),
                       result_type=parse_type("tensor<4x4xf32>"))
        return [b.value("ft.sub", b.value("ft.mul", odd_rows, wide), first_rows)]

    module = fusion_module(["tensor<4x8xf32>", "tensor<4xf32>"], body)
    run_both(backend, module, [torch.randn(4, 8), torch.randn(4)])


def test_yields_without_a_common_iteration_shape_run_eagerly(backend):
    module = fusion_module(["tensor<6x4xf32>"], lambda b, a: [
        b.value("ft.exp", a[0]), b.value("ft.slice", b.value("ft.exp", a[0]), dim=1, start=0, end=2, step=1)])
    plan = backend.compile(module, backend.capabilities())
    assert list(plan.fallback_ops) == ["ft.fusion (shapes [6, 4] and [6, 2] do not broadcast)"]
    run_both(backend, module, [torch.randn(6, 4)])


def test_a_dynamic_reshape_takes_its_size_operand(backend):
    def body(b, args):
        x, rows = args  # x: ?x8, reshaped to ?x2x4 with `rows` as the dynamic size
        split = b.create("ft.reshape", [x, rows], result_types=[parse_type("tensor<?x2x4xf32>")]).result
        return [b.value("ft.exp", b.value("ft.transpose", split, perm=(0, 2, 1)))]

    module = fusion_module(["tensor<?x8xf32>", "i64"], body)
    kernel = backend.emit(module, backend.capabilities(), "triton")
    assert "'sizes': ['{1}']" in kernel
    for rows in (3, 10):
        run_both(backend, module, [torch.randn(rows, 8), rows])


UNARY = ["exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "atan",
         "sigmoid", "silu", "erf", "reciprocal", "floor", "ceil", "round", "trunc", "neg", "abs", "sign", "relu"]
BINARY = ["add", "sub", "mul", "div", "floordiv", "remainder", "fmod", "pow", "maximum", "minimum"]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 1e-9, -1e-9, 30.0, -30.0]


def _special_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3
    picks = torch.randint(0, len(SPECIALS), shape, generator=generator)
    use = torch.rand(shape, generator=generator) < 0.3
    return torch.where(use, torch.tensor(SPECIALS)[picks], x)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(UNARY), dtype=st.sampled_from(["f32", "f64"]), seed=st.integers(0, 2**16))
def test_unary_ops_match_torch_including_nan_and_inf(backend, name, dtype, seed):
    """In f64 too, to f64's tolerance: the f32-accurate formulas (series, polynomials) must not
    serve f64 (f64 atan runs in eager torch, counted)."""
    module = fusion_module([f"tensor<8x16x{dtype}>"], lambda b, a: [b.value(f"ft.{name}", a[0])])
    run_both(backend, module, [_special_input((8, 16), seed).to(parse_type(dtype).torch_dtype)])


@pytest.mark.parametrize("name", ["sqrt", "rsqrt", "pow"])
def test_f64_square_roots(backend, name):
    """Symbolic sizes under dynamic shapes reach kernels as f64 scalars (x / math.sqrt(x.shape[-1])),
    and Triton's correctly rounded tl.sqrt_rn takes f32 only."""
    def body(b, a):
        return [b.value("ft.pow", a[0], constant(b, 0.5, "f64")) if name == "pow" else b.value(f"ft.{name}", a[0])]

    module = fusion_module(["tensor<8x16xf64>"], body)
    run_both(backend, module, [_special_input((8, 16), 7).double()])


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(BINARY), dtype=st.sampled_from(["f32", "f64"]), seed=st.integers(0, 2**16))
def test_binary_ops_match_torch_including_nan_and_inf(backend, name, dtype, seed):
    module = fusion_module([f"tensor<8x16x{dtype}>", f"tensor<16x{dtype}>"], lambda b, a: [b.value(f"ft.{name}", *a)])
    torch_dtype = parse_type(dtype).torch_dtype
    run_both(backend, module, [_special_input((8, 16), seed).to(torch_dtype),
                               _special_input((16,), seed + 1).to(torch_dtype)])


def test_nan_propagation_of_extrema_clamp_and_where(backend):
    def body(b, args):
        x, y = args
        clamped = b.value("ft.clamp", x, min=-1.0, max=1.0)
        chosen = b.value("ft.where", b.value("ft.isnan", x), y, b.value("ft.relu", x))
        return [b.value("ft.maximum", x, y), b.value("ft.minimum", x, y), clamped, chosen,
                b.value("ft.isinf", y)]

    module = fusion_module(["tensor<4x8xf32>", "tensor<4x8xf32>"], body)
    x = torch.tensor([math.nan, 1.0, -math.inf, 3.0, -0.0, 0.0, 2.0, math.nan] * 4).reshape(4, 8)
    y = torch.tensor([0.0, math.nan, 1.0, math.inf, 0.0, -0.0, math.nan, math.nan] * 4).reshape(4, 8)
    outputs = run_both(backend, module, [x, y])
    assert outputs[0].isnan().sum() == 16  # NaN in either operand wins, as in torch.maximum


@pytest.mark.parametrize("op", ["pow", "floordiv", "remainder", "fmod", "maximum", "div"])
def test_integer_arithmetic(backend, op):
    module = fusion_module(["tensor<64xi64>", "tensor<64xi64>"], lambda b, a: [b.value(f"ft.{op}", *a)])
    x = torch.randint(-50, 50, (64,))
    y = torch.randint(1, 9, (64,)) * torch.where(torch.rand(64) < 0.5, -1, 1)
    if op == "pow":
        y = torch.full((64,), 3)
        module = fusion_module(["tensor<64xi64>"], lambda b, a: [b.value("ft.pow", a[0], b.value(
            "ft.constant", value=DenseAttr(torch.tensor(3)), result_type=parse_type("tensor<i64>")))])
        run_both(backend, module, [x])
        return
    run_both(backend, module, [x, y])


# --- narrow floats: every op rounds its result to its type, as eager does ------------------


def test_a_bf16_result_cast_to_f32_holds_the_bf16_value(backend):
    """Found by hypothesis: tanh in bf16, then a cast to f32.  The f32 result must be the
    bf16 tanh, tanh(1.5390625) = 0.91204 rounded to 0.91015625; the unrounded f32 tanh
    (the cast folded away) is 2e-3 from it, 200 times the f32 tolerance."""
    module = fusion_module(["tensor<bf16>"], lambda b, a: [cast(b, b.value("ft.tanh", a[0]), "f32")])
    out = run_both(backend, module, [torch.tensor(1.5390625, dtype=torch.bfloat16)])[0]
    assert out.item() == torch.tensor(math.tanh(1.5390625), dtype=torch.float64).bfloat16().item() == 0.91015625


def test_bf16_arithmetic_rounds_every_op_like_eager(backend):
    """add and mul are correctly rounded in f32 and then in bf16, so the kernel and eager agree
    bit for bit, f32 cast, floor and comparisons included."""
    module = fusion_module(BF16_ROUNDING_TYPES, bf16_rounding_body)
    args = bf16_rounding_inputs()
    plan = backend.compile(module, backend.capabilities())
    for actual, expected in zip(plan(*args), run_module(module, args), strict=True):
        assert torch.equal(actual, expected)


def test_softmax_to_f16_along_a_leading_dim_is_rounded_once(backend):
    """Found by hypothesis: eager's softmax along a non-last dim is one f16 step off the
    correctly rounded value here (it rounds an intermediate); the kernel rounds once, so it is
    the closer of the two to fp64.  This is why the random-program test takes the tolerance of
    the narrowest type a result passed through, not of the type it ends in."""
    result_type = parse_type("tensor<3x1x1xf16>")
    module = fusion_module(["tensor<3x1x1xf32>"], lambda b, a: [
        cast(b, b.value("ft.softmax", a[0], dim=0, result_type=result_type), "f32")], "reduction")
    x = torch.tensor([-0.29050925374031067, -1.0703703165054321, 1.2644586563110352]).reshape(3, 1, 1)
    truth = torch.softmax(x.half().double(), 0)  # softmax to f16 casts its input to f16 first
    actual = backend.compile(module, backend.capabilities())(x)[0]
    assert torch.equal(actual, truth.half().float())
    assert relative_error(run_module(module, [x])[0], truth) <= TOLERANCE[torch.float16]


# --- reductions -----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean", "amax", "amin"])
@pytest.mark.parametrize(("dims", "keepdim"), [((2,), True), ((2,), False), ((1,), False), ((1,), True)])
def test_reductions_over_last_and_middle_dim(backend, reduction, dims, keepdim):
    def body(b, args):
        x = b.value("ft.mul", args[0], constant(b, 2.0))
        return [b.value(f"ft.{reduction}", x, dims=dims, keepdim=keepdim)]

    module = fusion_module(["tensor<3x17x9xf32>"], body, "reduction")
    x = torch.randn(3, 17, 9)
    x[1, 2, 3] = math.nan
    x[2, 4, 1] = math.inf
    run_both(backend, module, [x])


def test_rms_norm_in_bf16_with_a_row_statistic_output(backend):
    def body(b, args):
        x, w = args
        xf = cast(b, x, "f32")
        mean_square = b.value("ft.mean", b.value("ft.mul", xf, xf), dims=(1,), keepdim=True)
        rstd = b.value("ft.rsqrt", b.value("ft.add", mean_square, constant(b, 1e-6)))
        y = b.value("ft.mul", b.value("ft.mul", xf, rstd), cast(b, w, "f32"))
        return [cast(b, y, "bf16"), rstd]

    module = fusion_module(["tensor<?x96xbf16>", "tensor<96xbf16>"], body, "reduction")
    run_both(backend, module, [torch.randn(7, 96).bfloat16(), torch.randn(96).bfloat16()])


def test_boolean_and_integer_reductions(backend):
    def body(b, args):
        x, n = args
        positive = b.value("ft.gt", x, constant(b, 0.0))
        return [b.value("ft.any", positive, dims=(1,), keepdim=False),
                b.value("ft.all", positive, dims=(1,), keepdim=False),
                b.value("ft.sum", n, dims=(1,), keepdim=True),
                b.value("ft.amax", n, dims=(1,), keepdim=False)]

    module = fusion_module(["tensor<5x12xf32>", "tensor<5x12xi32>"], body, "reduction")
    x = torch.randn(5, 12)
    x[0] = -1.0
    x[1] = 1.0
    run_both(backend, module, [x, torch.randint(-1000, 1000, (5, 12), dtype=torch.int32)])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax(backend, name, dim):
    module = fusion_module(["tensor<2x19x6xf32>"],
                           lambda b, a: [b.value(f"ft.{name}", a[0], dim=dim, result_type=a[0].type)], "reduction")
    x = torch.randn(2, 19, 6) * 4
    x[0, 0, 0] = math.nan  # its whole row becomes NaN, as in torch
    x[1, 3, :] = -math.inf  # an all -inf row gives NaN in torch
    run_both(backend, module, [x])


def test_softmax_of_bf16_in_f32_with_a_looped_dynamic_row(backend):
    """A dynamic row length is reduced in a loop of RBLOCK steps (three passes here)."""
    module = fusion_module(["tensor<3x?xbf16>"], lambda b, a: [
        b.value("ft.softmax", a[0], dim=1, result_type=parse_type("tensor<3x?xf32>"))], "reduction")
    plan = backend.compile(module, backend.capabilities())
    kernel_source = backend.emit(module, backend.capabilities(), "triton")
    assert "for roffset in tl.range(0, size0, RBLOCK):" in kernel_source
    x = torch.randn(3, 2500).bfloat16()
    assert_matches(plan(x)[0], run_module(module, [x])[0])


# --- whole programs grouped by fuse-elementwise --------------------------------------------


@settings(max_examples=25, deadline=None)
@given(module=runnable_modules(), seed=seeds())
def test_random_programs_fused_by_fuse_elementwise_match_the_reference(backend, module, seed):
    inputs = random_inputs(module, seed)
    expected = run_module(module, inputs)
    tolerances = result_tolerances(module, TOLERANCE)
    PassManager("fuse-elementwise").run(module)
    actual = backend.compile(module, backend.capabilities())(*inputs)
    for a, e, tolerance in zip(actual, expected, tolerances, strict=True):
        if isinstance(e, torch.Tensor):
            assert_matches(a, e, tolerance)
        else:
            assert a == e


# --- dynamic sizes, plans, fallbacks ------------------------------------------------------


def test_new_sizes_reuse_the_same_kernel(backend):
    module = fusion_module(["tensor<?x?xf32>", "tensor<?xf32>"],
                           lambda b, a: [b.value("ft.mul", b.value("ft.exp", a[0]), a[1])])
    plan, kernels = backend.compile_with_kernels(module, backend.capabilities())
    for rows, cols in [(3, 5), (17, 70), (1, 1)]:
        args = [torch.randn(rows, cols), torch.randn(cols)]
        assert_matches(plan(*args)[0], run_module(module, args)[0])
    assert cache_stats().misses == 1
    _, kernels_again = backend.compile_with_kernels(module, backend.capabilities())
    assert kernels_again[0].kernel is kernels[0].kernel
    assert cache_stats().hits == 1 and cache_stats().misses == 1
    assert kernels[0].launch["do_not_specialize"] == ["size0", "size1"]


def test_sizes_a_kernel_takes_to_be_equal_are_checked_at_launch(backend):
    module = fusion_module(["tensor<?xf32>", "tensor<?xf32>"], lambda b, a: [b.value("ft.add", *a)])
    plan = backend.compile(module, backend.capabilities())
    assert "check_equal_sizes('fused_add', (s0, s1))" in plan.source
    run_both(backend, module, [torch.randn(9), torch.randn(9)])
    with pytest.raises(FlagtreeError, match=r"kernel fused_add: its inputs have sizes 9 and 10"):
        plan(torch.randn(9), torch.randn(10))


def test_plan_source_is_readable_python(backend):
    def body(b, args):
        return [b.value("ft.add", b.value("ft.exp", args[0]), args[1])]

    module = fusion_module(["tensor<4x?xf32>", "tensor<?xf32>"], body)
    source = backend.emit(module, backend.capabilities(), "python")
    ast.parse(source)
    assert source.startswith("# flagtree launch plan for @main (backend: interpret)")
    assert re.search(r"^    s0 = arg0\.shape\[1\]$", source, re.M)
    assert "buf0 = torch.empty((4, s0), dtype=torch.float32, device=device)" in source
    assert re.search(r"fused_exp_add\[\(triton\.cdiv\(4 \* s0, \d+\),\)\]\(arg0, arg1, buf0, s0, \*arg0\.stride\(\)",
                     source)
    assert source.rstrip().endswith("return [buf0]")
    kernels = backend.emit(module, backend.capabilities(), "triton")
    assert "def fused_exp_add(in0, in1, out0, size0" in kernels
    ast.parse(kernels)


def test_unsupported_region_runs_eagerly_and_is_counted(backend, caplog):
    module = fusion_module(["tensor<4x4xf32>", "tensor<4x4xf32>"], lambda b, a: [b.value("ft.atan2", *a)])
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        plan = backend.compile(module, backend.capabilities())
    assert "'ft.atan2' has no Triton lowering" in caplog.text
    assert list(plan.fallback_ops) == ["ft.fusion ('ft.atan2' has no Triton lowering yet)"]
    assert "eager fallbacks" in plan.source
    args = [torch.randn(4, 4), torch.randn(4, 4)]
    assert_matches(plan(*args)[0], run_module(module, args)[0])


# --- real GPU target, compiled without a GPU -----------------------------------------------

nvidia = pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")


class _Sm90Backend(InterpretBackend):
    name = "sm90-compile-check"

    def capabilities(self, device=None):
        from flagtree.backends.base import Capabilities

        return Capabilities(target="cuda:sm_90", dtypes=frozenset({"f32", "bf16", "f16", "i1", "i32", "i64"}),
                            shared_memory_bytes=227 * 1024, warp_size=32, max_threads_per_block=1024)

    def jit(self, function, do_not_specialize):
        return CompileForSm90(function, do_not_specialize)


def _memory_ops(compiled) -> set[str]:
    return set(re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"]))


def test_kernels_compile_for_sm90_with_vectorised_memory_access():
    """An RMSNorm row reduction (persistent) and a bf16 add-mul chain: 16-byte loads and stores."""
    backend = _Sm90Backend()

    def rms(b, args):
        x, w = args
        xf = cast(b, x, "f32")
        rstd = b.value("ft.rsqrt", b.value("ft.add", b.value("ft.mean", b.value("ft.mul", xf, xf), dims=(1,),
                                                             keepdim=True), constant(b, 1e-6)))
        return [cast(b, b.value("ft.mul", b.value("ft.mul", xf, rstd), cast(b, w, "f32")), "bf16")]

    def chain(b, args):
        x, y = args
        return [b.value("ft.mul", b.value("ft.add", x, y), y)]

    cases = [(fusion_module(["tensor<64x7168xbf16>", "tensor<7168xbf16>"], rms, "reduction"),
              [torch.empty(64, 7168, dtype=torch.bfloat16), torch.empty(7168, dtype=torch.bfloat16)]),
             (fusion_module(["tensor<64x4096xbf16>", "tensor<64x4096xbf16>"], chain),
              [torch.empty(64, 4096, dtype=torch.bfloat16)] * 2)]
    for module, args in cases:
        backend.compile(module, backend.capabilities())(*args)
        assert {"ld.global.v4.b32", "st.global.v4.b32"} <= _memory_ops(CompileForSm90.compiled[-1])


def test_dynamic_softmax_and_nan_aware_amax_compile_for_sm90():
    backend = _Sm90Backend()
    module = fusion_module(["tensor<?x?xbf16>"], lambda b, a: [
        b.value("ft.softmax", a[0], dim=1, result_type=parse_type("tensor<?x?xf32>")),
        b.value("ft.amax", a[0], dims=(1,), keepdim=False)], "reduction")
    backend.compile(module, backend.capabilities())(torch.empty(8, 3000, dtype=torch.bfloat16))
    ttir = CompileForSm90.compiled[-1].asm["ttir"]
    assert "scf.for" in ttir and "arith.maximumf" in ttir  # looped row, NaN-propagating max


@settings(max_examples=10, deadline=None)
@given(module=runnable_modules(), seed=seeds())
def test_kernels_of_random_fused_programs_compile_for_sm90(module, seed):
    """The interpreter accepts code the compiler rejects (types, scalars vs blocks); this does not."""
    inputs = random_inputs(module, seed)
    PassManager("fuse-elementwise").run(module)
    backend = _Sm90Backend()
    plan, kernels = backend.compile_with_kernels(module, backend.capabilities())
    compiled = len(CompileForSm90.compiled)
    plan(*inputs)
    assert len(CompileForSm90.compiled) - compiled == len(kernels)


# --- the example zoo through torch.compile ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zoo_models_on_the_interpret_backend_match_fp64_eager(dtype, caplog):
    """Every example model, compiled with target="interpret" (fp32 with dynamic shapes), runs
    every fusion region as a generated kernel and matches an fp64 eager run."""
    from examples.zoo import ZOO

    for name, factory in ZOO.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs = factory()
        with torch.no_grad():
            reference = model.double()(*(i.double() if i.is_floating_point() else i for i in inputs))
        model = model.to(dtype)
        inputs = tuple(i.to(dtype) if i.is_floating_point() else i for i in inputs)
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="flagtree"):
            compiled = torch.compile(model, backend="flagtree", options={"target": "interpret"},
                                     dynamic=dtype == torch.float32)
            actual = compiled(*inputs)
        assert "runs in eager torch" not in caplog.text, name
        actual = actual if isinstance(actual, torch.Tensor) else actual[0]
        reference = reference if isinstance(reference, torch.Tensor) else reference[0]
        error = torch.linalg.vector_norm(actual.double() - reference) / torch.linalg.vector_norm(reference)
        assert float(error) <= TOLERANCE[dtype], f"{name}: relative L2 error {float(error):.3g}"
