"""The `cpu` backend (FTIR → MLIR → LLVM JIT) against the reference backend.

Each op family is one ft.fusion kernel with many outputs (one JIT compile per family and
dtype, shared by the tests through module-scoped fixtures), run on random inputs at two
sizes of its dynamic dim.  Float results are compared with an fp64 run of the same
module (relative L2 error within DESIGN.md's tolerance per dtype, identical NaN/inf
positions); integer and boolean results must be exact.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("torch_mlir")

from flagtree.backends.cpu import CpuBackend, compiler, jit
from flagtree.backends.cpu import backend as cpu_backend_module
from flagtree.backends.cpu import kernel as kernel_module
from flagtree.backends.cpu.kernel import CpuKernel, KernelCallError
from flagtree.backends.reference import run_module
from flagtree.backends.registry import select_backend
from flagtree.ir import Block, Builder, DenseAttr, Module, Operation, Region, Value, new_function, verify
from flagtree.ir.parser import clone_module, parse_module
from flagtree.ir.printer import print_module
from flagtree.ir.types import ScalarType, TensorType, parse_type
from flagtree.passes.fuse_elementwise import FuseElementwise
from flagtree.runtime.cache import cache_stats
from tests.strategies import (
    BF16_ROUNDING_TYPES,
    bf16_rounding_body,
    bf16_rounding_inputs,
    random_inputs,
    result_tolerances,
    runnable_modules,
    seeds,
)

pytestmark = pytest.mark.mlir


TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
Body = Callable[[Builder, list[Value]], list[Value]]


# ---------------------------------------------------------------------- building kernels
def fused_module(arg_types: list[str], body: Body) -> Module:
    """@main(args) computing `body`, with every op inside one ft.fusion (one kernel)."""
    module = Module.empty()
    _, block = new_function(module, "main", [parse_type(t) for t in arg_types])
    builder = Builder(block)
    outputs = body(builder, list(block.args))
    region_block = Block([a.type for a in block.args])
    for op in list(block.ops):
        block.ops.remove(op)
        region_block.append(op)
    for outer, inner in zip(block.args, region_block.args):
        outer.replace_all_uses_with(inner)
    region_block.append(Operation("ft.yield", outputs))
    fusion = Operation("ft.fusion", list(block.args), [v.type for v in outputs], {"kind": "reduction"},
                       [Region([region_block])])
    block.append(fusion)
    block.append(Operation("func.return", fusion.results))
    verify(module)
    return module


def cast(b: Builder, value: Value, dtype: str) -> Value:
    return b.value("ft.cast", value, result_type=TensorType(value.type.shape, ScalarType(dtype)))


def fusion_of(module: Module) -> Operation:
    return next(op for op in module.function().regions[0].block.ops if op.name == "ft.fusion")


def retyped(module: Module, dtype: str) -> Module:
    """The same module computing in f64 instead of `dtype` (the accuracy reference)."""
    return parse_module(re.sub(rf"(?<=[<x\s(,]){dtype}(?![0-9A-Za-z])", "f64", print_module(module)))


class Family:
    """One compiled kernel for a family of ops, and its fp64 twin for checking."""

    def __init__(self, arg_types: list[str], body: Body, dtype: str | None = None):
        self.module = fused_module(arg_types, body)
        self.kernel: CpuKernel = compiler.compile_op(fusion_of(self.module))
        self.low = ScalarType(dtype).torch_dtype if dtype else None
        self.truth = retyped(self.module, dtype) if dtype else self.module

    @property
    def dtype(self) -> torch.dtype:
        """The element type of the kernel's first argument."""
        return self.kernel.unit.args[0].type.dtype.torch_dtype

    def check(self, args: list) -> list[torch.Tensor]:
        got = self.kernel(*args)
        expected = run_module(self.module, args)
        truth = run_module(self.truth, [a.double() if a.dtype == self.low else a for a in args])
        assert len(got) == len(expected)
        for index, (g, e, t) in enumerate(zip(got, expected, truth)):
            assert g.dtype == e.dtype and g.shape == e.shape, f"output #{index}"
            assert_matches(g, t.to(e.dtype) if e.dtype.is_floating_point else e, t, f"output #{index}")
        return got


def assert_matches(got: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor, what: str,
                   tolerance: float | None = None) -> None:
    """Exact for integers; for floats: NaN/inf where `expected` has them, and relative L2
    error against `truth` within `tolerance`, by default the dtype's."""
    if not got.dtype.is_floating_point:
        assert torch.equal(got, expected), f"{what}: {got} != {expected}"
        return
    g, e = got.double(), expected.double()
    nan_differs = torch.isnan(g) != torch.isnan(e)
    assert not nan_differs.any(), f"{what}: NaN differs at {_where(nan_differs)}: got {g[nan_differs][:4]}, " \
                                  f"expected {e[nan_differs][:4]}"
    inf_differs = torch.isinf(e) & (g != e)
    assert not inf_differs.any(), f"{what}: inf differs at {_where(inf_differs)}: got {g[inf_differs][:4]}"
    finite = torch.isfinite(e) & torch.isfinite(truth)
    error = (g[finite] - truth[finite].double()).norm() / truth[finite].double().norm().clamp_min(1e-30)
    tolerance = TOLERANCE[got.dtype] if tolerance is None else tolerance
    assert error <= tolerance, f"{what}: relative L2 error {error:.3g} > {tolerance:g}"


def _where(mask: torch.Tensor) -> list[list[int]]:
    return mask.nonzero()[:4].tolist()


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """x with inf, -inf, NaN, ±0, huge and tiny values in its first row."""
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 88.8, -104.0, 1e-30, 60.0])
    x = x.clone()
    x.view(-1)[: specials.numel()] = specials.to(x.dtype)
    return x


# ---------------------------------------------------------------------- elementwise families
UNARY_FLOAT = ["exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh",
               "atan", "sigmoid", "silu", "erf", "reciprocal", "floor", "ceil", "round", "trunc", "neg", "abs",
               "sign", "relu", "isnan", "isinf", "logical_not"]


def unary_body(b: Builder, args: list[Value]) -> list[Value]:
    (x,) = args
    results = [b.value(f"ft.{name}", x) for name in UNARY_FLOAT]
    results += [b.value("ft.gelu", x), b.value("ft.gelu", x, approximate="tanh")]
    return results


@pytest.fixture(scope="module", params=["f32", "bf16"])
def unary(request) -> Family:
    return Family([f"tensor<?x37x{request.param}>"], unary_body, request.param)


def test_unary_float_ops_match_eager_on_random_and_special_values(unary: Family):
    dtype = unary.dtype
    for rows in (3, 17):
        unary.check([with_specials(randn(rows, 37, dtype=dtype, scale=3.0))])


def binary_body(b: Builder, args: list[Value]) -> list[Value]:
    x, y = args
    ops = ["add", "sub", "mul", "div", "maximum", "minimum", "pow", "atan2", "fmod", "remainder", "floordiv"]
    results = [b.value(f"ft.{name}", x, y) for name in ops]
    results += [b.value(f"ft.{name}", x, y) for name in ("eq", "ne", "lt", "le", "gt", "ge")]
    results += [b.value(f"ft.{name}", x, y) for name in ("logical_and", "logical_or", "logical_xor")]
    results.append(b.value("ft.where", b.value("ft.gt", x, y), x, y))
    results.append(b.value("ft.clamp", x, min=-0.5, max=0.7))
    results.append(b.value("ft.clamp", y, min=0.25))
    return results


@pytest.fixture(scope="module", params=["f32", "bf16", "f64"])
def binary(request) -> Family:
    dtype = request.param
    return Family([f"tensor<?x1x16x{dtype}>", f"tensor<5x16x{dtype}>"], binary_body, dtype)


def test_binary_ops_broadcast_both_operands(binary: Family):
    dtype = binary.dtype
    for rows in (2, 9):
        x = with_specials(randn(rows, 1, 16, dtype=dtype, scale=2.0))
        y = randn(5, 16, dtype=dtype)
        y[0, :3] = 0.0  # division and remainder by zero
        outputs = binary.check([x, y])
        assert outputs[0].shape == (rows, 5, 16)


def test_kernel_reads_non_contiguous_inputs(binary: Family):
    dtype = binary.dtype
    x = randn(16, 1, 6, dtype=dtype).permute(2, 1, 0)  # a transposed view
    assert not x.is_contiguous()
    binary.check([x, randn(5, 16, dtype=dtype)])


def integer_body(b: Builder, args: list[Value]) -> list[Value]:
    x, y = args
    ops = ["add", "sub", "mul", "div", "floordiv", "remainder", "fmod", "maximum", "minimum", "bitwise_and",
           "bitwise_or", "bitwise_xor", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_xor"]
    results = [b.value(f"ft.{name}", x, y) for name in ops]
    results += [b.value(f"ft.{name}", x) for name in ("neg", "abs", "sign", "relu", "bitwise_not", "logical_not")]
    results.append(b.value("ft.clamp", x, min=-3, max=4))
    results.append(b.value("ft.where", b.value("ft.lt", x, y), x, y))
    results.append(b.value("ft.cast", x, result_type=TensorType(x.type.shape, ScalarType("f32"))))
    return results


@pytest.fixture(scope="module", params=["i64", "i32"])
def integer(request) -> Family:
    return Family([f"tensor<?x8x{request.param}>", f"tensor<8x{request.param}>"], integer_body)


def nonzero_integers(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    magnitude = torch.randint(1, 50, shape)
    return torch.where(torch.rand(shape) < 0.5, -magnitude, magnitude).to(dtype)


def test_integer_ops_are_exact(integer: Family):
    dtype = integer.dtype
    for rows in (4, 11):
        x = torch.randint(-100, 100, (rows, 8)).to(dtype)
        x[0, 0] = torch.iinfo(dtype).min  # wraps in neg/abs as in eager
        y = nonzero_integers(8, dtype=dtype)
        y[0] = 7
        integer.check([x, y])


def test_integer_division_traps_are_avoided(integer: Family):
    """x86 integer division traps (SIGFPE, killing the process) on ÷0 and INT_MIN÷-1;
    eager torch raises or traps there.  The kernel returns instead."""
    dtype = integer.dtype
    x = torch.full((3, 8), torch.iinfo(dtype).min, dtype=dtype)
    y = torch.tensor([0, -1, 0, -1, 1, 2, 3, 4], dtype=dtype)
    outputs = integer.kernel(x, y)
    assert outputs[0].shape == (3, 8)
    assert torch.equal(outputs[3][:, 1], x[:, 1])  # INT_MIN ÷ -1 wraps to INT_MIN


def boolean_body(b: Builder, args: list[Value]) -> list[Value]:
    p, q, x = args
    results = [b.value(f"ft.{name}", p, q) for name in
               ("logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_xor", "add", "mul", "maximum",
                "minimum", "eq", "ne", "lt", "ge")]
    results += [b.value("ft.logical_not", p), b.value("ft.bitwise_not", p), b.value("ft.where", p, x, b.value(
        "ft.neg", x))]
    results += [b.value("ft.cast", p, result_type=TensorType(p.type.shape, ScalarType(t))) for t in ("f32", "i64")]
    return results


def test_boolean_ops_are_exact():
    family = Family(["tensor<?x12xi1>", "tensor<1x12xi1>", "tensor<?x12xf32>"], boolean_body)
    for rows in (3, 8):
        family.check([torch.rand(rows, 12) < 0.5, torch.rand(1, 12) < 0.5, randn(rows, 12)])


def cast_body(b: Builder, args: list[Value]) -> list[Value]:
    x, n, p, q = args
    shape = x.type.shape
    rounded = cast(b, cast(b, x, "bf16"), "f32")  # rounds to bf16 inside the kernel
    return [rounded, cast(b, cast(b, x, "f16"), "f32"), cast(b, x, "i64"), cast(b, x, "i32"), cast(b, q, "i1"),
            cast(b, x, "f64"), cast(b, n, "bf16"), cast(b, n, "f32"), cast(b, n, "i8"), cast(b, p, "f32"),
            cast(b, p, "i64"), b.value("ft.add", rounded, b.value("ft.mul", rounded, x)),
            cast(b, cast(b, x, "f64"), "bf16"),
            cast(b, b.value("ft.full", result_type=TensorType(shape[1:], ScalarType("f32")), value=2.5), "i64"),
            cast(b, cast(b, n, "bf16"), "f32")]  # integers above 256 round to bf16's even neighbours


def test_casts_round_truncate_and_convert_like_eager():
    family = Family(["tensor<?x10xf32>", "tensor<?x10xi64>", "tensor<?x10xi1>", "tensor<?x10xf32>"], cast_body)
    for rows in (2, 5):
        x = randn(rows, 10, scale=100.0)
        x[0, :2] = torch.tensor([-0.0, 1e-3])
        special = with_specials(randn(rows, 10))  # NaN → i1 is true, -0.0 false
        family.check([x, torch.randint(-300, 300, (rows, 10)), torch.rand(rows, 10) < 0.5, special])


# ---------------------------------------------------------------------- narrow floats round every op
def test_a_bf16_result_cast_to_f32_holds_the_bf16_value():
    """tanh in bf16, then a cast to f32: the f32 result is the bf16 tanh, tanh(1.5390625) =
    0.91204 rounded to 0.91015625, not the f32 tanh (2e-3 away: 200 times the f32 tolerance)."""
    family = Family(["tensor<bf16>"], lambda b, a: [cast(b, b.value("ft.tanh", a[0]), "f32")])
    got = family.kernel(torch.tensor(1.5390625, dtype=torch.bfloat16))[0]
    assert got.item() == torch.tensor(math.tanh(1.5390625), dtype=torch.float64).bfloat16().item() == 0.91015625


def test_bf16_arithmetic_rounds_every_op_like_eager():
    """add and mul are correctly rounded in f32 and then in bf16, so the kernel and eager agree
    bit for bit, f32 cast, floor and comparisons included."""
    family = Family(BF16_ROUNDING_TYPES, bf16_rounding_body)
    args = bf16_rounding_inputs()
    for got, expected in zip(family.kernel(*args), run_module(family.module, args), strict=True):
        assert torch.equal(got, expected)


def test_bf16_reductions_round_once_at_the_end():
    """A bf16 sum, mean or softmax accumulates in f32 and rounds its result once, as eager's
    kernels do: 257 ones sum to 257 in f32, which rounds to the even 256 in bf16."""
    def body(b: Builder, args: list[Value]) -> list[Value]:
        (x,) = args
        total = b.value("ft.sum", x, dims=(-1,), keepdim=False)
        mean = b.value("ft.mean", x, dims=(-1,), keepdim=True)
        return [cast(b, total, "f32"), cast(b, b.value("ft.mul", mean, x), "f32"),
                cast(b, b.value("ft.softmax", x, dim=-1), "f32"), cast(b, b.value("ft.log_softmax", x, dim=-1), "f32")]

    family = Family(["tensor<3x257xbf16>"], body)
    x = torch.ones(3, 257, dtype=torch.bfloat16)
    x[1] = randn(257, scale=3.0).bfloat16()
    x[2] = torch.linspace(-5, 5, 257).bfloat16()
    got, expected = family.kernel(x), run_module(family.module, [x])
    assert got[0][0].item() == expected[0][0].item() == 256.0
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, g.bfloat16().float()), f"output #{index} holds values no bf16 has"
        assert_matches(g, e, e, f"output #{index}", TOLERANCE[torch.bfloat16])


def test_softmax_to_f16_rounds_its_input_first_and_its_result_once():
    """softmax from f32 to f16 computes on the input rounded to f16 and rounds its result once,
    so it is the correctly rounded softmax of the f16 input (eager's softmax along a non-last
    dim rounds an intermediate and is one f16 step off here; see test_triton_codegen)."""
    result_type = TensorType((3, 1, 1), ScalarType("f16"))
    family = Family(["tensor<3x1x1xf32>"], lambda b, a: [
        cast(b, b.value("ft.softmax", a[0], dim=0, result_type=result_type), "f32")])
    x = torch.tensor([-0.29050925374031067, -1.0703703165054321, 1.2644586563110352]).reshape(3, 1, 1)
    truth = torch.softmax(x.half().double(), 0)
    assert torch.equal(family.kernel(x)[0], truth.half().float())


# ---------------------------------------------------------------------- reductions and softmax
def reduction_body(b: Builder, args: list[Value]) -> list[Value]:
    x, ties = args
    last = {"dims": (-1,), "keepdim": False}
    results = [b.value(f"ft.{name}", x, **last) for name in ("sum", "mean", "amax", "amin")]
    # Halving is exact in every float type, so the product's error is the kernel's, not that of
    # bf16 factors (1 + 0.01·x rounded to bf16 would be up to 0.4% off each, 33 times over).
    halves = b.value("ft.mul", x, b.value("ft.constant", value=0.5, result_type=x.type.dtype))
    results.append(b.value("ft.prod", halves, **last))
    results.append(b.value("ft.sum", x, dims=(1,), keepdim=True))
    results.append(b.value("ft.mean", x, dims=(), keepdim=False))
    results.append(b.value("ft.var", x, dims=(2,), keepdim=True))
    results.append(b.value("ft.var", x, dims=(0, 2), keepdim=False, correction=0))
    positive = b.value("ft.gt", x, b.value("ft.constant", value=0.5, result_type=x.type.dtype))
    results += [b.value("ft.any", positive, **last), b.value("ft.all", positive, dims=(1,), keepdim=False)]
    results += [b.value("ft.argmax", ties, dim=-1, keepdim=False), b.value("ft.argmin", ties, dim=0, keepdim=True),
                b.value("ft.argmax", x, dim=1, keepdim=True)]
    return results


@pytest.fixture(scope="module", params=["f32", "bf16"])
def reductions(request) -> Family:
    dtype = request.param
    return Family([f"tensor<?x6x33x{dtype}>", f"tensor<?x6x33x{dtype}>"], reduction_body, dtype)


def test_reductions_over_last_middle_and_all_dims(reductions: Family):
    dtype = reductions.dtype
    for batch in (2, 7):
        # Mean 1: sums are well conditioned, so the tolerance measures the kernel, not cancellation.
        x = (randn(batch, 6, 33) + 1).to(dtype)
        ties = torch.randint(-2, 3, (batch, 6, 33)).to(dtype)  # argmax/argmin pick the first of equal values
        reductions.check([x, ties])


def test_reductions_propagate_nan(reductions: Family):
    dtype = reductions.dtype
    x = randn(3, 6, 33, dtype=dtype)
    x[1, 2, 5] = float("nan")
    reductions.check([x, x])


def softmax_body(b: Builder, args: list[Value]) -> list[Value]:
    (x,) = args
    wide = TensorType(x.type.shape, ScalarType("f32"))
    return [b.value("ft.softmax", x, dim=-1), b.value("ft.log_softmax", x, dim=-1), b.value("ft.softmax", x, dim=0),
            b.value("ft.softmax", x, dim=-1, result_type=wide)]


@pytest.fixture(scope="module", params=["f32", "bf16"])
def softmax(request) -> Family:
    return Family([f"tensor<?x50x{request.param}>"], softmax_body, request.param)


def test_softmax_matches_eager_with_masked_rows(softmax: Family):
    dtype = softmax.dtype
    for rows in (4, 13):
        x = randn(rows, 50, dtype=dtype, scale=4.0)
        x[1, 10:] = -float("inf")  # a causal-mask style row
        x[2, :] = -float("inf")  # a fully masked row is NaN, as in eager
        softmax.check([x])


def row_body(b: Builder, args: list[Value]) -> list[Value]:
    x, weight = args  # an RMS norm and a softmax: row-wise reductions over the last dim
    f32 = ScalarType("f32")
    wide = b.value("ft.cast", x, result_type=TensorType(x.type.shape, f32))
    mean_square = b.value("ft.mean", b.value("ft.mul", wide, wide), dims=(-1,), keepdim=True)
    epsilon = b.value("ft.constant", value=1e-6, result_type=f32)
    normed = b.value("ft.mul", wide, b.value("ft.rsqrt", b.value("ft.add", mean_square, epsilon)))
    scaled = b.value("ft.mul", b.value("ft.cast", normed, result_type=x.type), weight)
    return [scaled, b.value("ft.softmax", scaled, dim=-1), b.value("ft.amax", scaled, dims=(1,), keepdim=False)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_row_blocks_split_over_threads_match_eager(dtype: str, monkeypatch: pytest.MonkeyPatch):
    """Big enough inputs run as row blocks on every core; ragged row counts split unevenly."""
    monkeypatch.setattr(kernel_module, "PARALLEL_MIN_ELEMENTS", 1 << 12)  # these sizes split, yet stay fast
    family = Family([f"tensor<?x200x{dtype}>", f"tensor<200x{dtype}>"], row_body, dtype)
    assert "scf.for" in compiler.tensor_level_mlir(fusion_of(family.module))  # row blocks
    torch_dtype = ScalarType(dtype).torch_dtype
    for rows in (0, 1, 333, 1001):
        family.check([randn(rows, 200, dtype=torch_dtype, scale=3.0), randn(200, dtype=torch_dtype)])


# ---------------------------------------------------------------------- views, generators, constants
def views_body(b: Builder, args: list[Value]) -> list[Value]:
    x, y = args  # x: ?x12xf32, y: 12x?xf32 (y is x transposed)
    f32 = ScalarType("f32")
    rows = b.value("ft.dim", x, dim=0)
    transposed = b.value("ft.transpose", y, perm=(1, 0))
    total = b.value("ft.add", x, transposed)
    split = b.value("ft.reshape", total, rows, result_type=TensorType((None, 3, 4), f32))
    unit = b.value("ft.reshape", total, rows, result_type=TensorType((None, 1, 12), f32))
    wide = b.value("ft.broadcast_to", b.value("ft.sum", x, dims=(1,), keepdim=True), rows,
                   result_type=TensorType((None, 12), f32))
    middle = b.value("ft.slice", x, dim=1, start=2, end=-1, step=1)
    strided = b.value("ft.slice", x, dim=1, start=1, end=12, step=3)
    tail = b.value("ft.slice", x, dim=0, start=-2, end=100, step=1)
    positions = b.value("ft.iota", result_type=TensorType((12,), f32), start=0.5, step=2.0)
    table = b.value("ft.constant", value=DenseAttr(torch.arange(12, dtype=torch.float32) ** 2),
                    result_type=TensorType((12,), f32))
    shifted = b.value("ft.add", b.value("ft.mul", x, positions), table)
    merged = b.value("ft.reshape", split, b.value("ft.mul", rows, b.value("ft.constant", value=12,
                                                                          result_type=ScalarType("i64"))),
                     result_type=TensorType((None,), f32))
    pairs = b.value("ft.reshape", middle, rows, result_type=TensorType((None, 3, 3), f32))  # a strided view
    return [split, unit, wide, middle, strided, tail, shifted, merged, pairs]


def test_views_generators_and_constants():
    family = Family(["tensor<?x12xf32>", "tensor<12x?xf32>"], views_body)
    for rows in (3, 10):
        x = randn(rows, 12)
        outputs = family.check([x, randn(rows, 12).t().contiguous()])
        assert outputs[1].shape == (rows, 1, 12) and outputs[7].shape == (rows * 12,)


def narrow_views_body(b: Builder, args: list[Value]) -> list[Value]:
    """Views of narrow-float inputs as rope and reshapes read them: a reshape that splits a dim,
    the two halves of its last dim, each times a table broadcast over the middle dims."""
    x, table = args  # x: ?x64, table: 8x8, one narrow float type
    dtype = x.type.dtype
    rows = b.value("ft.dim", x, dim=0)
    split = b.value("ft.reshape", x, rows, result_type=TensorType((None, 8, 8), dtype))
    halves = [b.value("ft.slice", split, dim=2, start=start, end=start + 4, step=1) for start in (0, 4)]
    left, right = (b.value("ft.mul", half, b.value("ft.slice", table, dim=1, start=0, end=4, step=1))
                   for half in halves)
    return [split, b.value("ft.sub", left, right), b.value("ft.exp", halves[1])]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_views_of_narrow_float_inputs_match_eager_bit_for_bit(dtype: str):
    """A reshape or slice of an f16/bf16 input reads it in place (no widened copy), and computes
    exactly what eager torch computes."""
    family = Family([f"tensor<?x64x{dtype}>", f"tensor<8x8x{dtype}>"], narrow_views_body, dtype)
    mlir = compiler.tensor_level_mlir(fusion_of(family.module))
    assert f"tensor.collapse_shape %t1 [[0, 1]] : tensor<?x64x{dtype}>" in mlir  # the input itself
    torch_dtype = ScalarType(dtype).torch_dtype
    for rows in (1, 6):
        args = [randn(rows, 64, dtype=torch_dtype, scale=2.0), randn(8, 8, dtype=torch_dtype)]
        got = family.check(args)
        for g, e in zip(got, run_module(family.module, args)):
            assert torch.equal(g, e)


def test_calls_alternating_between_shapes_and_strides_match_eager():
    """Each input signature packs its argument words once; a call writes only the data pointers, so
    calls that alternate between signatures, or pass size-1 dims with unusual strides (still
    contiguous), must each see their own sizes."""
    family = Family(["tensor<?x1x?xf32>", "tensor<?x1x?xf32>"], lambda b, args: [b.value("ft.mul", *args)])
    for rows, cols in ((3, 5), (17, 2), (3, 5), (1, 9), (17, 2)):
        x = randn(rows, 1, cols)
        y = randn(cols, rows, 1).permute(1, 2, 0)  # not contiguous: the wrapper copies it
        odd = torch.empty_strided((rows, 1, cols), (cols, 12345, 1)).copy_(randn(rows, 1, cols))
        assert odd.is_contiguous()
        family.check([x, y])
        family.check([odd, x])


# ---------------------------------------------------------------------- the kernel's contract
def test_one_compile_serves_every_size_of_a_dynamic_dim(unary: Family):
    engines = jit.cached_engine_count()
    for rows in (1, 5, 64):
        outputs = unary.kernel(randn(rows, 37, dtype=unary.dtype))
        assert outputs[0].shape == (rows, 37)
    assert jit.cached_engine_count() == engines


def test_wrong_static_shape_is_an_error_not_a_crash(binary: Family):
    dtype = binary.dtype
    with pytest.raises(KernelCallError, match=r"argument #1 must be a tensor<5x16x"):
        binary.kernel(randn(2, 1, 16, dtype=dtype), randn(4, 16, dtype=dtype))
    with pytest.raises(KernelCallError, match="argument #0"):
        binary.kernel(randn(2, 1, 16, dtype=torch.float16), randn(5, 16, dtype=dtype))


def test_broadcasting_a_dynamic_dim_is_refused():
    """The kernel assumes `?` dims are never a broadcast 1 (Dynamo specialises 1); a call
    that breaks that would read out of bounds, so it raises instead."""
    family = Family(["tensor<?x4xf32>", "tensor<?x4xf32>"], lambda b, a: [b.value("ft.add", a[0], a[1])])
    family.check([randn(3, 4), randn(3, 4)])
    with pytest.raises(KernelCallError, match="dynamic dim 0 of an operand"):
        family.kernel(randn(1, 4), randn(3, 4))


def test_launch_writes_into_given_outputs(softmax: Family):
    dtype = softmax.dtype
    x = randn(6, 50, dtype=dtype)
    outputs = [torch.empty(shape, dtype=r.type.dtype.torch_dtype)
               for shape, r in zip(softmax.kernel.output_shapes([x]), softmax.kernel.unit.results)]
    softmax.kernel.launch([x], outputs)
    for got, expected in zip(outputs, softmax.kernel(x)):
        assert torch.equal(got, expected)


# ---------------------------------------------------------------------- MLIR text
def test_emitted_mlir_is_linalg_that_mlir_parses(binary: Family):
    module = clone_module(binary.module)
    text = CpuBackend().emit(module, CpuBackend().capabilities(), "mlir")
    assert "linalg.generic" in text and "func.func @main_fused_add_sub_mul_0(" in text
    assert "llvm." not in text.replace("llvm.emit_c_interface", "")  # linalg level, before lowering
    jit.parse_check(text)


# ---------------------------------------------------------------------- the backend
def test_backend_is_the_default_on_cpu_and_describes_the_host():
    backend = select_backend(torch.device("cpu"))
    assert backend.name == "cpu" and backend.availability().ok
    capabilities = backend.capabilities()
    extra = dict(capabilities.extra)
    assert capabilities.target == "host-cpu" and {"f32", "bf16", "i64"} <= capabilities.dtypes
    assert extra["isa"] and extra["vector_bits"] >= 128


def test_missing_torch_mlir_makes_the_backend_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_backend_module.importlib.util, "find_spec", lambda name: None)
    cpu_backend_module._torch_mlir_availability.cache_clear()
    try:
        availability = CpuBackend().availability()
    finally:
        monkeypatch.undo()
        cpu_backend_module._torch_mlir_availability.cache_clear()
    assert not availability.ok and "torch-mlir is not installed" in availability.reason


LLVM_OPTIONS_CHECK = """
import logging, sys, torch
from flagtree.backends.cpu import compiler, jit
from flagtree.ir.parser import parse_module
{setup}
logging.basicConfig(level=logging.WARNING)
module = parse_module(sys.argv[1])
fusion = next(op for op in module.function().regions[0].block.ops if op.name == "ft.fusion")
kernel = compiler.compile_op(fusion)
with jit._lock:
    jit._parse_llvm_options()  # a second time: a no-op
x, bias = torch.randn(33, 8), torch.randn(8)
got, = kernel(x, bias)
sys.exit(0 if torch.allclose(got, torch.sigmoid(x + bias), rtol=1e-6, atol=1e-7) else 3)
"""


@pytest.mark.parametrize("setup, warns", [("", False), ("jit._LLVM_LIBRARY = 'libNoSuchLibrary'", True)],
                         ids=["options", "no-library"])
def test_llvm_options_are_parsed_once_per_process(setup: str, warns: bool, tmp_path):
    """Kernels compile and compute correctly with LLVM_OPTIONS, parsing them again is a no-op, and
    without the library a warning says kernels run without them."""
    module = fused_module(["tensor<?x8xf32>", "tensor<8xf32>"],
                          lambda b, args: [b.value("ft.sigmoid", b.value("ft.add", *args))])
    done = subprocess.run([sys.executable, "-c", LLVM_OPTIONS_CHECK.format(setup=setup), print_module(module)],
                          capture_output=True, text=True, env={**os.environ, "FLAGTREE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("kernels run without -vectorizer-min-trip-count=2" in done.stderr) == warns, done.stderr[-2000:]


def test_torch_mlirs_llvm_has_every_llvm_option():
    """LLVM's C API ignores an option it does not know: a renamed one would silently stop applying."""
    library = jit.llvm_library()
    assert library is not None
    data = library.read_bytes()
    for option in jit.LLVM_OPTIONS:
        name = option.lstrip("-").split("=")[0]
        assert b"\x00" + name.encode() + b"\x00" in data, f"torch-mlir's LLVM has no option {name}"


def test_importing_the_backend_does_not_import_torch_mlir():
    code = "import sys, flagtree.backends.cpu; sys.exit('torch_mlir' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


MLP = """
"builtin.module"() ({
  "func.func"() <{function_type = (tensor<?x64xf32>, tensor<64x32xf32>, tensor<32xf32>)
                   -> (tensor<?x32xf32>, tensor<?x32xf32>), sym_name = "main"}> ({
  ^bb0(%x: tensor<?x64xf32>, %w: tensor<64x32xf32>, %b: tensor<32xf32>):
    %0 = "ft.matmul"(%x, %w) : (tensor<?x64xf32>, tensor<64x32xf32>) -> tensor<?x32xf32>
    %1 = "ft.add"(%0, %b) : (tensor<?x32xf32>, tensor<32xf32>) -> tensor<?x32xf32>
    %2 = "ft.gelu"(%1) : (tensor<?x32xf32>) -> tensor<?x32xf32>
    %3 = "ft.softmax"(%2) {dim = -1 : i64} : (tensor<?x32xf32>) -> tensor<?x32xf32>
    %4 = "ft.cumsum"(%3) {dim = 1 : i64} : (tensor<?x32xf32>) -> tensor<?x32xf32>
    "func.return"(%3, %4) : (tensor<?x32xf32>, tensor<?x32xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    return tmp_path


def compiled_mlp(backend: CpuBackend) -> tuple[Module, Module, object]:
    original = parse_module(MLP)
    fused = clone_module(original)
    FuseElementwise().run(fused)
    return original, fused, backend.compile(fused, backend.capabilities())


def test_launch_plan_calls_blas_kernels_and_the_reference(cache_dir):
    original, _, plan = compiled_mlp(CpuBackend())
    assert "torch.matmul(" in plan.source and "= fused_add_gelu_softmax(" in plan.source
    for rows in (3, 20):
        args = [randn(rows, 64), randn(64, 32), randn(32)]
        for got, expected in zip(plan(*args), run_module(original, args)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_disk_cache_hit_skips_mlir_generation_and_lowering(cache_dir, monkeypatch):
    compiled_mlp(CpuBackend())
    before = cache_stats()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached kernel was generated again")

    monkeypatch.setattr(compiler, "tensor_level_mlir", must_not_run)
    monkeypatch.setattr(jit, "lower_to_llvm", must_not_run)
    original, _, plan = compiled_mlp(CpuBackend())
    assert cache_stats().hits > before.hits and cache_stats().misses == before.misses
    args = [randn(5, 64), randn(64, 32), randn(32)]
    torch.testing.assert_close(plan(*args)[0], run_module(original, args)[0], rtol=1e-5, atol=1e-6)


def test_a_fusion_the_generator_cannot_lower_runs_in_eager_torch(cache_dir):
    module = fused_module(["tensor<?x8xf32>"], lambda b, a: [b.value("ft.cumsum", b.value("ft.exp", a[0]), dim=1)])
    backend = CpuBackend()
    plan = backend.compile(module, backend.capabilities())
    assert sum(plan.fallback_ops.values()) == 1 and "ft.cumsum" in next(iter(plan.fallback_ops))
    x = randn(4, 8)
    torch.testing.assert_close(plan(x)[0], torch.cumsum(torch.exp(x), 1))


@settings(max_examples=25)
@given(module=runnable_modules(max_ops=6), seed=seeds())
def test_random_fused_programs_match_the_reference(module: Module, seed: int):
    """The kernel rounds every f16/bf16 op as eager does, so a result differs from eager only
    by the f32 rounding of approximated functions and summation order, carried through the
    narrowest type it is computed in."""
    fused = clone_module(module)
    FuseElementwise(concat=True).run(fused)  # as the cpu pipeline runs it
    backend = CpuBackend()
    plan = backend.compile(fused, backend.capabilities())
    args = random_inputs(module, seed)
    results = zip(plan(*args), run_module(module, args), result_tolerances(module, TOLERANCE), strict=True)
    for index, (got, expected, tolerance) in enumerate(results):
        if isinstance(expected, torch.Tensor):
            assert_matches(got, expected, expected, f"result #{index}", tolerance)
        else:
            assert got == expected
