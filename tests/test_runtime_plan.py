"""Launch plans (flagtree/runtime/plan.py) and the shared lowering (backends/lowering.py).

The lowering is checked differentially: random programs lowered to plans whose fusion
regions all run eagerly must compute bit-for-bit what the reference backend computes.
"""

from __future__ import annotations

import ast
import logging
import math
import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.backends.lowering import UnsupportedRegion, lower_function
from flagtree.backends.reference import run_module
from flagtree.backends.reference.executor import ExecutionError
from flagtree.ir import Builder, Module, new_function, parse_module, parse_type
from flagtree.ir.types import ScalarType, TensorType
from flagtree.runtime import DeviceConstant, LaunchPlan, PlanWriter
from tests.strategies import random_inputs, runnable_modules, seeds


def test_bind_reuses_the_name_of_the_same_object_and_numbers_others():
    writer = PlanWriter("test", 0)
    first, second = object(), object()
    assert writer.bind("kernel", first) == "kernel"
    assert writer.bind("kernel", first) == "kernel"
    assert writer.bind("kernel", second) == "kernel_1"
    with pytest.raises(ValueError, match="not a Python identifier"):
        writer.bind("not-a-name", first)


def test_sizes_are_computed_once_and_names_pass_through():
    writer = PlanWriter("test", 1)
    assert writer.size("arg0.shape[1]") == "s0"
    assert writer.size("arg0.shape[1]") == "s0"
    assert writer.size("arg0.shape[0]") == "s1"
    assert writer.size("64") == "64" and writer.size("s0") == "s0"
    plan = writer.build(["s0", "s1"])
    assert plan(torch.zeros(3, 5)) == [5, 3]
    assert plan.source.count("arg0.shape[1]") == 1


def test_arg_rejects_an_index_outside_the_signature():
    with pytest.raises(IndexError, match="has 2 arguments, not 3"):
        PlanWriter("test", 2).arg(2)


@settings(max_examples=30, deadline=None)
@given(text=st.text())
def test_notes_and_comments_stay_single_comment_lines(text):
    writer = PlanWriter("test", 1)
    writer.note(text)
    writer.comment(text)
    writer.line("out = arg0 + 1")
    plan = writer.build(["out"])
    ast.parse(plan.source)
    assert plan(1) == [2]


def test_plan_errors_show_the_plan_line():
    writer = PlanWriter("test", 1)
    writer.line("out = arg0.no_such_attribute")
    plan = writer.build(["out"])
    with pytest.raises(AttributeError) as raised:
        plan(1)
    assert "out = arg0.no_such_attribute" in "".join(traceback.format_tb(raised.value.__traceback__))


def test_device_constant_is_copied_once_per_device():
    constant = DeviceConstant(torch.arange(3))
    cpu = torch.device("cpu")
    assert constant.on(cpu) is constant.on(cpu)
    assert torch.equal(constant.on(cpu), torch.arange(3))


MODULE = """
"builtin.module"() ({
  "func.func"() <{function_type = (tensor<4x?xf32>, tensor<?x3xf32>) -> (tensor<4x3xf32>, i64, tensor<4x?xf32>),
                  sym_name = "main"}> ({
  ^bb0(%arg0: tensor<4x?xf32>, %arg1: tensor<?x3xf32>):
    %0 = "ft.matmul"(%arg0, %arg1) : (tensor<4x?xf32>, tensor<?x3xf32>) -> tensor<4x3xf32>
    %1 = "ft.constant"() {value = dense<[1.0, 2.0, 3.0]> : tensor<3xf32>} : () -> tensor<3xf32>
    %2 = "ft.fusion"(%0, %1) ({
    ^bb0(%a: tensor<4x3xf32>, %b: tensor<3xf32>):
      %3 = "ft.add"(%a, %b) : (tensor<4x3xf32>, tensor<3xf32>) -> tensor<4x3xf32>
      "ft.yield"(%3) : (tensor<4x3xf32>) -> ()
    }) {kind = "elementwise"} : (tensor<4x3xf32>, tensor<3xf32>) -> tensor<4x3xf32>
    %4 = "ft.softmax"(%2) {dim = -1 : i64} : (tensor<4x3xf32>) -> tensor<4x3xf32>
    %5 = "ft.dim"(%arg0) {dim = 1 : i64} : (tensor<4x?xf32>) -> i64
    %6 = "ft.torch_call"(%arg0) {target = "aten::relu.default", args = [{operand = 0 : i64}]}
         : (tensor<4x?xf32>) -> tensor<4x?xf32>
    "func.return"(%4, %5, %6) : (tensor<4x3xf32>, i64, tensor<4x?xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"""


def _eager_regions(op, writer, operands):
    raise UnsupportedRegion("this test compiles no region")


def test_lowering_writes_library_calls_reference_calls_and_deletes_dead_buffers(caplog):
    module = parse_module(MODULE, "plan.ftir")
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        plan = lower_function(module, "test", {"ft.fusion": _eager_regions})
    source = plan.source
    assert "buf0 = torch.matmul(arg0, arg1)" in source
    assert "const0 = dense.on(device)" in source
    assert "buf2 = ft_softmax(buf1, dim=-1)" in source
    assert "s0 = arg0.shape[1]" in source
    assert "del buf0" in source and "del buf1" in source
    assert source.rstrip().endswith("return [buf2, s0, buf3]")
    assert "plan.ftir:8:10" in caplog.text  # the region's location is reported
    assert plan.fallback_ops == {"aten.relu.default": 1, "ft.fusion (this test compiles no region)": 1}
    args = [torch.randn(4, 5), torch.randn(5, 3)]
    actual, expected = plan(*args), run_module(module, args)
    assert torch.equal(actual[0], expected[0]) and actual[1] == expected[1] == 5
    assert torch.equal(actual[2], expected[2])


def test_the_fusion_callback_names_the_region_results():
    module = parse_module(MODULE, "plan.ftir")

    def add_in_plan(op, writer, operands):
        writer.line(f"fused = {operands[0]} + {operands[1]}")
        return ["fused"]

    plan = lower_function(module, "test", {"ft.fusion": add_in_plan})
    assert "fused = buf0 + const0" in plan.source
    args = [torch.randn(4, 2), torch.randn(2, 3)]
    assert torch.equal(plan(*args)[0], run_module(module, args)[0])
    assert isinstance(plan, LaunchPlan) and plan.backend == "test"


def test_scalar_constants_and_fills_with_inf_and_nan_are_python_literals():
    module = Module.empty()
    _, block = new_function(module, "main", [])
    b = Builder(block)
    scalars = [b.value("ft.constant", value=v, result_type=parse_type("f32")) for v in (math.nan, -math.inf, 1.5)]
    filled = b.value("ft.full", value=math.inf, result_type=parse_type("tensor<2xf32>"))
    b.create("func.return", [*scalars, filled], result_types=[])
    nan, minus_inf, one_and_a_half, infinities = lower_function(module, "test", {"ft.fusion": _eager_regions})()
    assert math.isnan(nan) and minus_inf == -math.inf and one_and_a_half == 1.5
    assert torch.equal(infinities, torch.full((2,), math.inf))


@settings(max_examples=40, deadline=None)
@given(module=runnable_modules(), seed=seeds())
def test_lowered_random_programs_compute_what_the_reference_computes(module, seed):
    inputs = random_inputs(module, seed)
    expected = run_module(module, inputs)
    actual = lower_function(module, "test", {"ft.fusion": _eager_regions})(*inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and a.shape == e.shape
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a[~a.isnan()], e[~e.isnan()])
        else:
            assert a == e


VIEWS_MODULE = """
"func.func"() <{function_type = (tensor<?x6xf32>, tensor<f32>) -> (tensor<?x2x3xf32>, tensor<3x2x?xf32>,
                                  tensor<4x?x6xf32>, tensor<1x1xf32>), sym_name = "main"}> ({
^bb0(%x: tensor<?x6xf32>, %s: tensor<f32>):
  %n = "ft.dim"(%x) {dim = 0 : i64} : (tensor<?x6xf32>) -> i64
  %split = "ft.reshape"(%x, %n) : (tensor<?x6xf32>, i64) -> tensor<?x2x3xf32>
  %moved = "ft.transpose"(%split) {perm = array<i64: 2, 1, 0>} : (tensor<?x2x3xf32>) -> tensor<3x2x?xf32>
  %wide = "ft.broadcast_to"(%x, %n) : (tensor<?x6xf32>, i64) -> tensor<4x?x6xf32>
  %unit = "ft.reshape"(%s) : (tensor<f32>) -> tensor<1x1xf32>
  "func.return"(%split, %moved, %wide, %unit) : (tensor<?x2x3xf32>, tensor<3x2x?xf32>, tensor<4x?x6xf32>,
                                                 tensor<1x1xf32>) -> ()
}) : () -> ()
"""


@pytest.mark.parametrize("rows", [2, 7])
def test_views_are_tensor_methods_that_copy_nothing(rows):
    """ft.reshape, ft.transpose and ft.broadcast_to run as the tensor method their reference calls,
    with dynamic sizes from ft.dim: the results are views of the input and equal the reference's."""
    module = parse_module(VIEWS_MODULE, "views.ftir")
    plan = lower_function(module, "test", {})
    for call in ("= arg0.reshape((s0, 2, 3))", ".permute((2, 1, 0))", "= arg0.expand((4, s0, 6))",
                 "= arg1.reshape((1, 1))"):
        assert call in plan.source
    assert not plan.fallback_ops and "ft_" not in plan.source
    x, scalar = torch.randn(rows, 6), torch.tensor(2.5)
    actual, expected = plan(x, scalar), run_module(module, [x, scalar])
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.stride() == e.stride() and torch.equal(a, e)
    assert all(a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for a in actual[:3])


def _index_module(x_shape: tuple[int, ...], dim: int, count: int, index_dtype: str) -> Module:
    """@main(x, index) = x[..., index, ...] at `dim` (one ft.index op)."""
    result_shape = (*x_shape[:dim], count, *x_shape[dim + 1:])
    module = Module.empty()
    x_type = TensorType(x_shape, ScalarType("f32"))
    index_type = TensorType((count,), ScalarType(index_dtype))
    _, block = new_function(module, "main", [x_type, index_type])
    b = Builder(block)
    result = b.value("ft.index", *block.args, dims=(dim,), result_type=TensorType(result_shape, ScalarType("f32")))
    b.create("func.return", [result], result_types=[])
    return module


@settings(max_examples=40, deadline=None)
@given(data=st.data(), x_shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       count=st.integers(0, 6), index_dtype=st.sampled_from(["i64", "i32"]), seed=seeds())
def test_one_dim_index_is_an_index_select_that_wraps_negative_entries_as_aten_index_does(
        data, x_shape, count, index_dtype, seed):
    dim = data.draw(st.integers(0, len(x_shape) - 1))
    size = x_shape[dim]
    module = _index_module(x_shape, dim, count, index_dtype)
    plan = lower_function(module, "test", {})
    assert "buf0 = index_select(arg0, " in plan.source
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=generator)
    index = torch.randint(-size, size, (count,), generator=generator).to(ScalarType(index_dtype).torch_dtype)
    assert torch.equal(plan(x, index)[0], run_module(module, [x, index])[0])


@pytest.mark.parametrize("entry", [3, -4])
def test_one_dim_index_out_of_range_raises_like_aten_index(entry):
    module = _index_module((3, 2), 0, 1, "i64")
    x, index = torch.randn(3, 2), torch.tensor([entry])
    with pytest.raises(ExecutionError) as reference_error:
        run_module(module, [x, index])
    assert isinstance(reference_error.value.__cause__, IndexError)
    with pytest.raises(IndexError):
        lower_function(module, "test", {})(x, index)
