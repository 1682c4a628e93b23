"""The generic passes (canonicalize, cse, dce, fold): each keeps what the IR computes.

Differential tests run a module through the reference backend on fresh random inputs
before and after a pass and require identical results (NaN positions and the sign of
zero included), on hypothesis-generated chains of elementwise and shape ops.  Only the
rewrites canonicalize documents as inexact (pow → mul/sqrt, reciprocal(sqrt) → rsqrt) get
a tolerance.  Targeted tests check that each rewrite fires and that unsafe ones do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagtree.backends.reference import run_module
from flagtree.ir import (
    Block,
    Builder,
    DenseAttr,
    Module,
    Operation,
    OpResult,
    Region,
    ResourceAttr,
    ScalarType,
    TensorType,
    Value,
    new_function,
    parse_type,
    print_module,
    verify,
)
from flagtree.passes import Pass, PassManager, get_pass, preset_pipeline
from flagtree.passes.canonicalize import holds_exactly

INF, NAN = math.inf, math.nan
INT64_MAX = 2**63 - 1
# Rewrites canonicalize documents as inexact involve these ops.
INEXACT_ROOTS = frozenset({"ft.pow", "ft.reciprocal"})


# ----------------------------------------------------------------------------- helpers


class Fn:
    """A module with one function `@main`, built op by op."""

    def __init__(self, *arg_types: str):
        self.module = Module.empty()
        _, block = new_function(self.module, "main", [parse_type(t) for t in arg_types])
        self.builder = Builder(block)
        self.args = list(block.args)

    def op(self, name: str, *operands: Value, type: str | None = None, **attributes) -> Value:
        result_type = parse_type(type) if type else None
        return self.builder.value(name, *operands, result_type=result_type, **attributes)

    def const(self, type_: str, value) -> Value:
        t = parse_type(type_)
        if isinstance(t, ScalarType):
            return self.builder.value("ft.constant", result_type=t, value=value)
        data = torch.tensor(value, dtype=torch.float64).to(t.dtype.torch_dtype).expand(t.shape).contiguous()
        return self.builder.value("ft.constant", result_type=t, value=DenseAttr(data))

    def ret(self, *values: Value) -> Module:
        self.builder.create("func.return", values)
        verify(self.module)
        return self.module


def count(module: Module, name: str) -> int:
    return sum(op.name == name for op in module.walk())


def random_inputs(module: Module) -> list:
    """Fresh standard-normal draws for every argument (never exactly zero); sizes get 3."""
    inputs = []
    for arg in module.function("main").regions[0].block.args:
        if isinstance(arg.type, TensorType):
            shape = [3 if d is None else d for d in arg.type.shape]
            if arg.type.dtype.is_float:
                inputs.append(torch.randn(shape, dtype=torch.float64).to(arg.type.dtype.torch_dtype))
            else:
                inputs.append(torch.randint(-100, 100, shape).to(arg.type.dtype.torch_dtype))
        else:
            inputs.append(3)
    return inputs


def assert_same_results(expected: list, actual: list, inexact: bool = False) -> None:
    """Equal dtype, shape, NaN positions; equal values and signs of zero (or, when `inexact`,
    values within max(1e-6, eps) relative)."""
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        if not isinstance(want, torch.Tensor):
            assert type(got) is type(want) and (got == want or (math.isnan(got) and math.isnan(want)))
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        if not want.is_floating_point():
            assert torch.equal(got, want)
            continue
        assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ"
        want, got = want[~want.isnan()], got[~got.isnan()]
        if inexact:
            info = torch.finfo(want.dtype)
            torch.testing.assert_close(got, want, rtol=max(1e-6, info.eps), atol=info.tiny)
        else:
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def check_pass(pass_: Pass, module: Module, inexact: bool = False) -> bool:
    """Run `pass_` on `module` and check it keeps the results on random inputs, keeps the
    IR valid, and reports a change exactly when the IR text changed."""
    inputs = random_inputs(module)
    expected = run_module(module, inputs)
    text_before = print_module(module)
    changed = pass_.run(module)
    verify(module)
    assert changed == (print_module(module) != text_before)
    assert_same_results(expected, run_module(module, inputs), inexact)
    return changed


def canonicalize(module: Module) -> bool:
    inexact = any(op.name in INEXACT_ROOTS for op in module.walk())
    return check_pass(get_pass("canonicalize")(), module, inexact)


# --------------------------------------------------------------- random op chains

SPECIAL_VALUES = (0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 0.25, 4.0, 3.0, INF, -INF, NAN)
UNARY = ("ft.neg", "ft.reciprocal", "ft.sqrt", "ft.abs", "ft.relu", "ft.exp", "ft.tanh")
BINARY = ("ft.add", "ft.sub", "ft.mul", "ft.div", "ft.pow", "ft.maximum", "ft.minimum")


@dataclass
class Program:
    module: Module

    def __repr__(self) -> str:
        return "\n" + print_module(self.module)


class ChainBuilder:
    """Draws a random chain of ops; every value it makes is a float tensor in `pool`."""

    def __init__(self, draw, fn: Fn):
        self.draw = draw
        self.fn = fn
        self.pool: list[Value] = list(fn.args)

    def pick(self, same_type_as: Value | None = None) -> Value:
        """A value from the pool; the newest one half of the time, so chains compose."""
        pool = self.pool if same_type_as is None else [v for v in self.pool if v.type == same_type_as.type]
        return pool[-1] if self.draw(st.booleans()) else self.draw(st.sampled_from(pool))

    def constant(self, x: Value, broadcasting: bool = True) -> Value:
        """A constant of x's dtype whose shape broadcasts with x (possibly growing it)."""
        shape = x.type.shape
        shapes = [(), shape, (1,) * len(shape), shape[-1:]] + ([(2, *shape)] if broadcasting else [])
        chosen = self.draw(st.sampled_from(shapes))
        return self.fn.const(str(TensorType(tuple(chosen), x.type.dtype)), self.number())

    def number(self) -> float:
        return self.draw(st.one_of(st.sampled_from(SPECIAL_VALUES), st.floats(-3, 3, width=16)))

    def unary(self) -> Value:
        return self.fn.op(self.draw(st.sampled_from(UNARY)), self.pick())

    def binary_with_constant(self) -> Value:
        x, name = self.pick(), self.draw(st.sampled_from(BINARY))
        c = self.constant(x)
        if name == "ft.pow" and is_half(c):
            x = self.fn.op("ft.abs", x)  # fractional powers of negative numbers are NaN anyway
        return self.fn.op(name, *((c, x) if self.draw(st.booleans()) else (x, c)))

    def binary_of_values(self) -> Value:
        x = self.pick()
        return self.fn.op(self.draw(st.sampled_from(BINARY[:3] + BINARY[5:])), x, self.pick(same_type_as=x))

    def cast(self) -> Value:
        x = self.pick()
        via = self.draw(st.sampled_from(("f32", "bf16", "f64")))
        y = self.fn.op("ft.cast", x, type=str(x.type.with_dtype(ScalarType(via))))
        back = self.draw(st.sampled_from(("f32", "bf16", "f64", str(x.type.dtype))))
        return self.fn.op("ft.cast", y, type=str(x.type.with_dtype(ScalarType(back))))

    def where_not(self) -> Value:
        x = self.pick()
        condition = self.fn.op("ft.logical_not", self.fn.op("ft.gt", x, self.constant(x, broadcasting=False)))
        other = self.pick(same_type_as=x) if self.draw(st.booleans()) else self.constant(x, broadcasting=False)
        return self.fn.op("ft.where", condition, x, other)

    def reshape(self) -> Value:
        x = self.pick()
        shape = x.type.shape
        target = self.draw(st.sampled_from([shape, (math.prod(shape),), (1, *shape), (*shape, 1)]))
        return self.fn.op("ft.reshape", x, type=str(TensorType(tuple(target), x.type.dtype)))

    def transpose(self) -> Value:
        x = self.pick()
        perm = tuple(self.draw(st.permutations(range(x.type.rank))))
        return self.fn.op("ft.transpose", x, perm=perm)

    def broadcast(self) -> Value:
        x = self.pick()
        target = self.draw(st.sampled_from([x.type.shape, (2, *x.type.shape)]))
        return self.fn.op("ft.broadcast_to", x, type=str(TensorType(tuple(target), x.type.dtype)))

    def slice(self) -> Value:
        x = self.pick()
        dim = self.draw(st.integers(0, x.type.rank - 1))
        size = x.type.shape[dim]
        start = self.draw(st.sampled_from((0, 1, -size)))
        end = self.draw(st.sampled_from((size, size + 5, INT64_MAX, max(size - 1, 1))))
        return self.fn.op("ft.slice", x, dim=dim, start=start, end=end, step=self.draw(st.sampled_from((1, 2))))

    def concat(self) -> Value:
        x = self.pick()
        operands = self.draw(st.sampled_from([[x], [x, x], [x, self.pick(same_type_as=x)]]))
        return self.fn.op("ft.concat", *operands, dim=self.draw(st.integers(0, x.type.rank - 1)))

    def duplicate(self) -> Value:
        """The same op again on the same operands: work for cse."""
        x = self.pick()
        if not isinstance(x, OpResult):
            return self.unary()
        op = x.owner
        return self.fn.builder.create(op.name, op.operands, dict(op.attributes), op.result_types).results[x.index]

    def constant_expression(self) -> Value:
        """An op on constants only: work for fold."""
        x = self.pick()
        lhs, rhs = self.fn.const(str(x.type), self.number()), self.constant(x, broadcasting=False)
        return self.fn.op(self.draw(st.sampled_from(BINARY)), lhs, rhs)

    def rewrite_candidate(self) -> Value:
        """One of the forms canonicalize rewrites, on a random operand."""
        x = self.pick()
        form = self.draw(st.sampled_from(("constant", "rsqrt", "negations", "transposes", "reshapes")))
        if form == "constant":
            name = self.draw(st.sampled_from(BINARY))
            value = self.draw(st.sampled_from((-0.0, 0.0, 1.0, -1.0, 2.0, 0.5, 0.25, 4.0)))
            base = self.fn.op("ft.abs", x) if name == "ft.pow" and value == 0.5 else x
            return self.fn.op(name, base, self.fn.const(f"tensor<{x.type.dtype}>", value))
        if form == "rsqrt":
            return self.fn.op("ft.reciprocal", self.fn.op("ft.sqrt", x))
        if form == "negations":
            return self.fn.op("ft.neg", self.fn.op("ft.neg", x))
        step = ChainBuilder.transpose if form == "transposes" else ChainBuilder.reshape
        self.pool.append(step(self))
        return step(self)  # on the value just made, half of the time

    STEPS = (rewrite_candidate, rewrite_candidate, rewrite_candidate, unary, binary_with_constant,
             binary_with_constant, binary_of_values, cast, where_not, reshape, transpose, broadcast, slice, concat,
             duplicate, constant_expression)

    def grow(self) -> None:
        step = self.draw(st.sampled_from(self.STEPS))
        self.pool.append(step(self))


def is_half(c: Value) -> bool:
    data = c.owner.attributes["value"].value
    return bool((data == 0.5).all())


@st.composite
def programs(draw) -> Program:
    """A module computing a random chain of elementwise and shape ops on two f32/bf16 tensors."""
    dtype = draw(st.sampled_from(("f32", "bf16")))
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    fn = Fn(*[str(TensorType(tuple(shape), ScalarType(dtype)))] * 2)
    chain = ChainBuilder(draw, fn)
    for _ in range(draw(st.integers(1, 8))):
        chain.grow()
    returned = [chain.pool[-1], *draw(st.lists(st.sampled_from(chain.pool), max_size=2))]
    return Program(fn.ret(*returned))


# ------------------------------------------------------------------ differential tests


@given(programs())
def test_canonicalize_keeps_results(program):
    canonicalize(program.module)


@given(programs())
def test_canonicalize_reaches_a_fixed_point(program):
    get_pass("canonicalize")(max_iterations=100).run(program.module)
    assert not get_pass("canonicalize")().run(program.module)


@pytest.mark.parametrize("name", ["cse", "dce", "fold"])
@given(program=programs())
def test_exact_pass_keeps_results_and_is_idempotent(name, program):
    check_pass(get_pass(name)(), program.module)
    assert not get_pass(name)().run(program.module)


@given(programs())
def test_preset_pipeline_keeps_results(program):
    module = program.module
    inexact = any(op.name in INEXACT_ROOTS for op in module.walk())
    inputs = random_inputs(module)
    expected = run_module(module, inputs)
    PassManager(preset_pipeline(3), verify_each=True).run(module)
    assert_same_results(expected, run_module(module, inputs), inexact)


# ---------------------------------------------------------------- canonicalize fires


def _build(arg: str, body) -> Module:
    fn = Fn(arg)
    return fn.ret(body(fn, fn.args[0]))


CANONICAL_REWRITES = {
    "x + (-0.0)": ("tensor<4xf32>", lambda f, x: f.op("ft.add", x, f.const("tensor<4xf32>", -0.0)), {"ft.add": 0}),
    "(-0.0) + x": ("tensor<4xf32>", lambda f, x: f.op("ft.add", f.const("tensor<f32>", -0.0), x), {"ft.add": 0}),
    "x - 0.0": ("tensor<2x4xbf16>", lambda f, x: f.op("ft.sub", x, f.const("tensor<4xbf16>", 0.0)), {"ft.sub": 0}),
    "i32: x + 0": ("tensor<4xi32>", lambda f, x: f.op("ft.add", x, f.const("tensor<4xi32>", 0)), {"ft.add": 0}),
    "i64 size: n + 0": ("i64", lambda f, x: f.op("ft.add", x, f.const("i64", 0)), {"ft.add": 0}),
    "x * 1": ("tensor<4xf32>", lambda f, x: f.op("ft.mul", x, f.const("tensor<1xf32>", 1.0)), {"ft.mul": 0}),
    "1 * x": ("tensor<4xbf16>", lambda f, x: f.op("ft.mul", f.const("tensor<bf16>", 1.0), x), {"ft.mul": 0}),
    "x / 1": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>", 1.0)), {"ft.div": 0}),
    "x ** 1": ("tensor<4xf32>", lambda f, x: f.op("ft.pow", x, f.const("tensor<f32>", 1.0)), {"ft.pow": 0}),
    "neg(neg(x))": ("tensor<4xf32>", lambda f, x: f.op("ft.neg", f.op("ft.neg", x)), {"ft.neg": 0}),
    "x ** 2": ("tensor<4xf32>", lambda f, x: f.op("ft.pow", x, f.const("tensor<f32>", 2.0)),
               {"ft.pow": 0, "ft.mul": 1}),
    "x ** 0.5": ("tensor<4xf32>", lambda f, x: f.op("ft.pow", f.op("ft.abs", x), f.const("tensor<f32>", 0.5)),
                 {"ft.pow": 0, "ft.sqrt": 1}),
    "1 / sqrt(x)": ("tensor<4xf32>", lambda f, x: f.op("ft.reciprocal", f.op("ft.sqrt", f.op("ft.abs", x))),
                    {"ft.reciprocal": 0, "ft.sqrt": 0, "ft.rsqrt": 1}),
    "cast to own type": ("tensor<4xf32>", lambda f, x: f.op("ft.cast", x, type="tensor<4xf32>"), {"ft.cast": 0}),
    "bf16→f32→bf16": ("tensor<4xbf16>", lambda f, x: f.op("ft.cast", f.op("ft.cast", x, type="tensor<4xf32>"),
                                                           type="tensor<4xbf16>"), {"ft.cast": 0}),
    "f32→f64→f32": ("tensor<4xf32>", lambda f, x: f.op("ft.cast", f.op("ft.cast", x, type="tensor<4xf64>"),
                                                         type="tensor<4xf32>"), {"ft.cast": 0}),
    "i8→i32→i8": ("tensor<4xi8>", lambda f, x: f.op("ft.cast", f.op("ft.cast", x, type="tensor<4xi32>"),
                                                      type="tensor<4xi8>"), {"ft.cast": 0}),
    "x * -1": ("tensor<4xf32>", lambda f, x: f.op("ft.mul", x, f.const("tensor<f32>", -1.0)),
               {"ft.mul": 0, "ft.neg": 1}),
    "x / 4": ("tensor<4xbf16>", lambda f, x: f.op("ft.div", x, f.const("tensor<4xbf16>", 4.0)),
              {"ft.div": 0, "ft.mul": 1}),
    "x / -0.5": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>", -0.5)),
                 {"ft.div": 0, "ft.mul": 1}),
    "x / 2^-126": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>", 2.0**-126)),
                   {"ft.div": 0, "ft.mul": 1}),
    "maximum(x, +0.0)": ("tensor<4xf32>", lambda f, x: f.op("ft.maximum", x, f.const("tensor<4xf32>", 0.0)),
                         {"ft.maximum": 0, "ft.relu": 1}),
    "where(not c, a, b)": ("tensor<4xf32>", lambda f, x: f.op(
        "ft.where", f.op("ft.logical_not", f.op("ft.gt", x, f.const("tensor<f32>", 0.0))), x,
        f.op("ft.exp", x)), {"ft.logical_not": 0, "ft.where": 1}),
    "reshape to own type": ("tensor<2x3xf32>", lambda f, x: f.op("ft.reshape", x, type="tensor<2x3xf32>"),
                            {"ft.reshape": 0}),
    "reshape(reshape(x))": ("tensor<2x3xf32>", lambda f, x: f.op(
        "ft.reshape", f.op("ft.reshape", x, type="tensor<6xf32>"), type="tensor<3x2xf32>"), {"ft.reshape": 1}),
    "identity transpose": ("tensor<2x3xf32>", lambda f, x: f.op("ft.transpose", x, perm=(0, 1)),
                           {"ft.transpose": 0}),
    "transpose(transpose(x))": ("tensor<2x3x4xf32>", lambda f, x: f.op(
        "ft.transpose", f.op("ft.transpose", x, perm=(1, 2, 0)), perm=(1, 0, 2)), {"ft.transpose": 1}),
    "transposes that cancel": ("tensor<2x3x4xf32>", lambda f, x: f.op(
        "ft.transpose", f.op("ft.transpose", x, perm=(1, 2, 0)), perm=(2, 0, 1)), {"ft.transpose": 0}),
    "broadcast_to own type": ("tensor<2x3xf32>", lambda f, x: f.op("ft.broadcast_to", x, type="tensor<2x3xf32>"),
                              {"ft.broadcast_to": 0}),
    "slice of the whole dim": ("tensor<2x3xf32>", lambda f, x: f.op("ft.slice", x, dim=1, start=-3, end=10,
                                                                     step=1), {"ft.slice": 0}),
    "slice of a whole dynamic dim": ("tensor<2x?xf32>", lambda f, x: f.op("ft.slice", x, dim=-1, start=0,
                                                                           end=INT64_MAX, step=1), {"ft.slice": 0}),
    "concat of one": ("tensor<2x3xf32>", lambda f, x: f.op("ft.concat", x, dim=0), {"ft.concat": 0}),
}


@pytest.mark.parametrize("case", CANONICAL_REWRITES)
def test_canonical_rewrite_fires(case):
    arg, body, counts = CANONICAL_REWRITES[case]
    module = _build(arg, body)
    assert canonicalize(module)
    assert {name: count(module, name) for name in counts} == counts
    body = module.function().regions[0].block
    assert all(r.uses for op in body.ops[:-1] for r in op.results), "ops a rewrite leaves unused are erased"


def test_dynamic_reshape_to_own_type_is_dropped_with_one_dynamic_dim():
    fn = Fn("tensor<?x4xf32>", "i64")
    x, n = fn.args
    module = fn.ret(fn.op("ft.reshape", x, n, type="tensor<?x4xf32>"))
    assert canonicalize(module)
    assert count(module, "ft.reshape") == 0


def test_constants_move_to_the_right_of_commutative_ops():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    product = fn.op("ft.mul", fn.const("tensor<4xf32>", 3.0), x)
    module = fn.ret(product)
    assert canonicalize(module)
    assert product.owner.operands[0] is x


def test_composed_transpose_permutes_like_the_pair():
    module = _build("tensor<2x3x4xf32>", CANONICAL_REWRITES["transpose(transpose(x))"][1])
    canonicalize(module)
    (transpose,) = [op for op in module.walk() if op.name == "ft.transpose"]
    x = torch.randn(2, 3, 4)
    assert torch.equal(x.permute(transpose.attributes["perm"]), x.permute(1, 2, 0).permute(1, 0, 2))


def test_half_power_gives_eager_torch_values_at_negative_zero_and_minus_infinity():
    """The documented difference: sqrt(-0.0) = -0.0 and sqrt(-inf) = NaN, as `x ** 0.5` in torch."""
    fn = Fn("tensor<2xf32>")
    module = fn.ret(fn.op("ft.pow", fn.args[0], fn.const("tensor<f32>", 0.5)))
    get_pass("canonicalize")().run(module)
    x = torch.tensor([-0.0, -INF])
    (result,) = run_module(module, [x])
    assert torch.equal(result.isnan(), (x**0.5).isnan()) and torch.equal(result.signbit(), (x**0.5).signbit())


# ------------------------------------------------------------- canonicalize holds back

UNSAFE_REWRITES = {
    "x * 0 (x may be inf or NaN)": ("tensor<4xf32>", lambda f, x: f.op("ft.mul", x, f.const("tensor<f32>", 0.0)),
                                    {"ft.mul": 1}),
    "x - x (x may be inf or NaN)": ("tensor<4xf32>", lambda f, x: f.op("ft.sub", x, x), {"ft.sub": 1}),
    "x + (+0.0) (turns -0.0 into +0.0)": ("tensor<4xf32>", lambda f, x: f.op(
        "ft.add", x, f.const("tensor<4xf32>", 0.0)), {"ft.add": 1}),
    "x + zeros that broadcast x up": ("tensor<4xf32>", lambda f, x: f.op(
        "ft.add", x, f.const("tensor<3x4xf32>", -0.0)), {"ft.add": 1}),
    "x + zeros that broadcast a size-1 dim": ("tensor<1x4xf32>", lambda f, x: f.op(
        "ft.add", x, f.const("tensor<3x1xf32>", -0.0)), {"ft.add": 1}),
    "x * ones that add a dim": ("tensor<4xf32>", lambda f, x: f.op("ft.mul", x, f.const("tensor<1x4xf32>", 1.0)),
                                {"ft.mul": 1}),
    "x * [1, 2] (not a splat)": ("tensor<2xf32>", lambda f, x: f.op("ft.mul", x, f.const("tensor<2xf32>",
                                                                                       [1.0, 2.0])), {"ft.mul": 1}),
    "f32→bf16→f32": ("tensor<4xf32>", lambda f, x: f.op("ft.cast", f.op("ft.cast", x, type="tensor<4xbf16>"),
                                                          type="tensor<4xf32>"), {"ft.cast": 2}),
    "f16→bf16→f16": ("tensor<4xf16>", lambda f, x: f.op("ft.cast", f.op("ft.cast", x, type="tensor<4xbf16>"),
                                                          type="tensor<4xf16>"), {"ft.cast": 2}),
    "x / 3": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>", 3.0)), {"ft.div": 1}),
    "x / 2^127 (1/c subnormal)": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>", 2.0**127)),
                                  {"ft.div": 1}),
    "x / 2^-130 (1/c overflows)": ("tensor<4xf32>", lambda f, x: f.op("ft.div", x, f.const("tensor<f32>",
                                                                                          2.0**-130)), {"ft.div": 1}),
    "maximum(x, -0.0)": ("tensor<4xf32>", lambda f, x: f.op("ft.maximum", x, f.const("tensor<f32>", -0.0)),
                         {"ft.maximum": 1, "ft.relu": 0}),
    "maximum(+0.0, x) (torch returns the first of two zeros)": ("tensor<4xf32>", lambda f, x: f.op(
        "ft.maximum", f.const("tensor<f32>", 0.0), x), {"ft.maximum": 1, "ft.relu": 0}),
    "i64 division by 1 (goes through floating point)": ("tensor<4xi64>", lambda f, x: f.op(
        "ft.div", x, f.const("tensor<i64>", 1)), {"ft.div": 1}),
    "slice with step 2": ("tensor<2x3xf32>", lambda f, x: f.op("ft.slice", x, dim=1, start=0, end=3, step=2),
                          {"ft.slice": 1}),
    "slice dropping the last element": ("tensor<2x3xf32>", lambda f, x: f.op("ft.slice", x, dim=1, start=0,
                                                                              end=-1, step=1), {"ft.slice": 1}),
    "broadcast_to a dynamic type (a ? may be 1)": ("tensor<?x3xf32>", lambda f, x: f.op(
        "ft.broadcast_to", x, f.op("ft.dim", x, dim=0), type="tensor<?x3xf32>"), {"ft.broadcast_to": 1}),
    "x - c stays a subtraction": ("tensor<4xf32>", lambda f, x: f.op("ft.sub", x, f.const("tensor<f32>", 2.0)),
                                  {"ft.sub": 1, "ft.add": 0}),
}


@pytest.mark.parametrize("case", UNSAFE_REWRITES)
def test_unsafe_rewrite_does_not_fire(case):
    arg, body, counts = UNSAFE_REWRITES[case]
    module = _build(arg, body)
    canonicalize(module)
    assert {name: count(module, name) for name in counts} == counts


def test_x_plus_positive_zero_would_change_negative_zero():
    """Why `x + (+0.0)` stays: it maps -0.0 to +0.0."""
    module = _build("tensor<4xf32>", UNSAFE_REWRITES["x + (+0.0) (turns -0.0 into +0.0)"][1])
    (result,) = run_module(module, [torch.full((4,), -0.0)])
    assert not result.signbit().any()


def test_maximum_with_zero_on_the_left_keeps_the_sign_of_zero():
    module = _build("tensor<2xf32>", UNSAFE_REWRITES["maximum(+0.0, x) (torch returns the first of two zeros)"][1])
    x = torch.tensor([-0.0, 0.0])
    (expected,) = run_module(module, [x])
    canonicalize(module)
    assert torch.equal(run_module(module, [x])[0].signbit(), expected.signbit())


# ----------------------------------------------------------------------- holds_exactly

EXHAUSTIVE = {"bf16": torch.int16, "f16": torch.int16, "f8E4M3FN": torch.uint8, "f8E5M2": torch.uint8,
              "f8E8M0FNU": torch.uint8}
INTEGERS = {"i1": (0, 1), "i8": (-128, 127), "ui8": (0, 255), "i16": (-(2**15), 2**15 - 1)}
WIDE = ("f64", "f32", "bf16", "f16", "f8E4M3FN", "f8E5M2", "i64", "i32", "i16", "i8")


def every_value(name: str) -> torch.Tensor:
    """Every value of a type of at most 16 bits."""
    if name in EXHAUSTIVE:
        bits = EXHAUSTIVE[name]
        return torch.arange(torch.iinfo(bits).min, torch.iinfo(bits).max + 1).to(bits).view(
            ScalarType(name).torch_dtype)
    low, high = INTEGERS[name]
    return torch.arange(low, high + 1).to(ScalarType(name).torch_dtype)


def same_numbers(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers: NaN where NaN, and the same sign of zero."""
    a, b = a.double(), b.double()
    kept = ~a.isnan()
    return (torch.equal(a.isnan(), b.isnan()) and torch.equal(a[kept], b[kept])
            and torch.equal(a[kept].signbit(), b[kept].signbit()))


@pytest.mark.parametrize("narrow", [*EXHAUSTIVE, *INTEGERS])
@pytest.mark.parametrize("wide", WIDE)
def test_holds_exactly_matches_what_casting_does(narrow, wide):
    values = every_value(narrow)
    exact = holds_exactly(ScalarType(wide), ScalarType(narrow))
    widened = values.to(ScalarType(wide).torch_dtype)
    assert exact == same_numbers(values, widened)
    if exact:
        assert same_numbers(values, widened.to(values.dtype)), "an exact widening cast must come back unchanged"


# --------------------------------------------------------------------------------- cse


def test_cse_merges_pure_duplicates():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    a, b = fn.op("ft.exp", x), fn.op("ft.exp", x)
    module = fn.ret(fn.op("ft.add", fn.op("ft.mul", a, x), fn.op("ft.mul", b, x)))
    assert check_pass(get_pass("cse")(), module)
    assert count(module, "ft.exp") == 1 and count(module, "ft.mul") == 1


@pytest.mark.parametrize("first, second", [(0.0, -0.0), (1, 1.0), (1.0, 2.0)])
def test_cse_keeps_ops_whose_attributes_differ_in_any_bit(first, second):
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    module = fn.ret(fn.op("ft.clamp", x, min=first), fn.op("ft.clamp", x, min=second))
    assert not check_pass(get_pass("cse")(), module)
    assert count(module, "ft.clamp") == 2


def test_cse_keeps_constants_of_opposite_zeros():
    fn = Fn()
    module = fn.ret(fn.const("tensor<2xf32>", 0.0), fn.const("tensor<2xf32>", -0.0))
    assert not get_pass("cse")().run(module)


def test_cse_never_merges_torch_calls():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    calls = [fn.builder.create("ft.torch_call", [x], {"target": "aten::exp.default", "args": [{"operand": 0}]},
                               [x.type]).result for _ in range(2)]
    module = fn.ret(*calls)
    assert not check_pass(get_pass("cse")(), module)
    assert count(module, "ft.torch_call") == 2


def _fusion_with_duplicates(fn: Fn, x: Value) -> Value:
    """An ft.fusion computing exp(x) twice inside its region."""
    block = Block([x.type])
    inner = Builder(block)
    first, second = inner.value("ft.exp", block.args[0]), inner.value("ft.exp", block.args[0])
    inner.create("ft.yield", [inner.value("ft.add", first, second)])
    fusion = Operation("ft.fusion", [x], [x.type], {"kind": "test"}, [Region([block])])
    fn.builder.block.append(fusion)
    return fusion.result


def test_cse_works_inside_regions_but_not_across_them():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    outer = fn.op("ft.exp", x)
    module = fn.ret(fn.op("ft.add", outer, _fusion_with_duplicates(fn, x)))
    assert check_pass(get_pass("cse")(), module)
    assert count(module, "ft.exp") == 2  # one inside the fusion, one outside


# --------------------------------------------------------------------------------- dce


def test_dce_erases_unused_pure_chains_only():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    fn.op("ft.tanh", fn.op("ft.exp", x))
    fn.builder.create("ft.torch_call", [x], {"target": "aten::exp.default", "args": [{"operand": 0}]}, [x.type])
    module = fn.ret(fn.op("ft.neg", x))
    assert check_pass(get_pass("dce")(), module)
    assert [op.name for op in module.function().regions[0].block.ops] == ["ft.torch_call", "ft.neg", "func.return"]


def test_dce_erases_dead_ops_inside_regions_and_unused_regions():
    fn = Fn("tensor<4xf32>")
    (x,) = fn.args
    used = _fusion_with_duplicates(fn, x)
    _fusion_with_duplicates(fn, x)
    body = used.owner.regions[0].block
    Builder(body, body.terminator).value("ft.sin", body.args[0])
    module = fn.ret(used)
    assert check_pass(get_pass("dce")(), module)
    assert count(module, "ft.fusion") == 1 and count(module, "ft.sin") == 0


def test_dce_reports_no_change_on_live_code():
    fn = Fn("tensor<4xf32>")
    module = fn.ret(fn.op("ft.exp", fn.args[0]))
    assert not get_pass("dce")().run(module)


# -------------------------------------------------------------------------------- fold


def test_fold_evaluates_chains_of_constant_ops():
    fn = Fn()
    a, b = fn.const("tensor<3xf32>", [1.0, 2.0, 3.0]), fn.const("tensor<f32>", 4.0)
    total = fn.op("ft.exp", fn.op("ft.sub", a, b))
    module = fn.ret(total)
    assert check_pass(get_pass("fold")(), module)
    ops = [op.name for op in module.walk()][2:]
    assert ops == ["ft.constant", "func.return"]
    value = module.function().regions[0].block.ops[0].attributes["value"].value
    assert torch.equal(value, torch.exp(torch.tensor([1.0, 2.0, 3.0]) - 4.0))


@pytest.mark.parametrize("limit, folds", [(5, True), (4, False)])
def test_fold_respects_max_elements(limit, folds):
    fn = Fn()
    module = fn.ret(fn.op("ft.neg", fn.const("tensor<5xf32>", 1.0)))
    assert get_pass("fold")(max_elements=limit).run(module) == folds
    assert count(module, "ft.neg") == (0 if folds else 1)


def test_fold_evaluates_scalar_sizes_and_static_dims():
    fn = Fn("tensor<6x?xf32>")
    (x,) = fn.args
    rows = fn.op("ft.dim", x, dim=0)
    columns = fn.op("ft.dim", x, dim=1)
    module = fn.ret(fn.op("ft.mul", rows, fn.const("i64", 7)), columns)
    assert check_pass(get_pass("fold")(), module)
    assert count(module, "ft.mul") == 0 and count(module, "ft.dim") == 1
    (product,) = [op for op in module.walk() if op.name == "ft.constant"]
    assert product.attributes["value"] == 42 and product.result.type == ScalarType("i64")


def test_fold_folds_every_result_of_a_multi_result_op():
    fn = Fn()
    topk = fn.builder.create("ft.topk", [fn.const("tensor<4xf32>", [3.0, 1.0, 4.0, 1.5])],
                             {"k": 2, "dim": 0, "largest": True, "sorted": True})
    module = fn.ret(*topk.results)
    assert check_pass(get_pass("fold")(), module)
    assert count(module, "ft.topk") == 0


def test_fold_leaves_resources_and_failing_evaluations_alone():
    fn = Fn()
    weight = fn.builder.value("ft.constant", result_type=parse_type("tensor<2xf32>"),
                              value=ResourceAttr("w", parse_type("tensor<2xf32>")))
    quotient = fn.op("ft.floordiv", fn.const("i64", 1), fn.const("i64", 0))
    module = fn.ret(fn.op("ft.neg", weight), quotient)
    assert not get_pass("fold")().run(module)
    assert count(module, "ft.neg") == 1 and count(module, "ft.floordiv") == 1


def test_fold_never_evaluates_impure_ops():
    fn = Fn()
    call = fn.builder.create("ft.torch_call", [fn.const("tensor<2xf32>", 1.0)],
                             {"target": "aten::exp.default", "args": [{"operand": 0}]}, [parse_type("tensor<2xf32>")])
    module = fn.ret(call.result)
    assert not get_pass("fold")().run(module)
