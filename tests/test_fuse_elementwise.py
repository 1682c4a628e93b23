"""fuse-elementwise: results before vs after on the reference backend (bit-identical), the
invariants of the groups it builds on random programs, and each grouping rule on small
graphs (RMSNorm, softmax, matmul epilogues, cycles, repeated cheap ops, yielded heavy ops)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# Registers the pass (explicitly, so these tests do not depend on who imports it).
import flagtree.passes.fuse_elementwise  # noqa: F401
from flagtree.backends.reference.executor import run_module
from flagtree.errors import OptionsError
from flagtree.ir import Builder, DenseAttr, Module, Operation, ScalarType, TensorType, Value, clone_module, verify
from flagtree.ir.builder import new_function
from flagtree.ir.parser import parse_module
from flagtree.ir.printer import print_module
from flagtree.ir.types import F32
from flagtree.passes import PassManager, parse_pipeline
from tests.strategies import modules, random_inputs, runnable_modules, seeds

# What a fusion region may hold, listed here rather than taken from the pass.
REDUCTIONS = {"ft.sum", "ft.mean", "ft.amax", "ft.amin", "ft.prod", "ft.any", "ft.all", "ft.argmax", "ft.argmin"}
ROW_REDUCTIONS = {"ft.softmax", "ft.log_softmax"}
CHEAP = {"ft.cast", "ft.reshape", "ft.transpose", "ft.broadcast_to", "ft.slice", "ft.constant"}
NEVER_FUSED = {"ft.matmul", "ft.conv", "ft.torch_call", "ft.topk", "ft.sort", "ft.gather", "ft.scatter", "ft.index",
               "ft.index_put", "ft.fusion", "ft.concat", "ft.cumsum", "ft.var"}


# ---------------------------------------------------------------- helpers


def fuse(module: Module, max_ops: int = 0, concat: bool = False) -> bool:
    """Run the pass through the pass manager (which verifies its output); True if it changed the IR."""
    result = PassManager(f"fuse-elementwise{{max-ops={max_ops} concat={str(concat).lower()}}}").run(module)
    return "fuse-elementwise" in result.changed


def fusions(module: Module) -> list[Operation]:
    return [op for op in module.walk() if op.name == "ft.fusion"]


def top_level_names(module: Module, function: str = "main") -> list[str]:
    return [op.name for op in module.function(function).regions[0].block.ops]


def assert_identical(expected: list[Any], actual: list[Any]) -> None:
    """Same dtypes, shapes and bits (NaN where NaN was)."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.dtype == a.dtype and e.shape == a.shape
        assert torch.equal(e, a) or (e.is_floating_point() and torch.equal(e.isnan(), a.isnan())
                                     and torch.equal(e[~e.isnan()], a[~a.isnan()])), (e, a)


def assert_same_results(before: Module, after: Module, seed: int) -> None:
    inputs = random_inputs(before, seed)
    assert_identical(run_module(before, inputs), run_module(after, inputs))


def is_computed(op: Operation) -> bool:
    """Ops the pass must neither copy nor drop (everything but cheap ops and structure)."""
    return op.name not in CHEAP | {"ft.yield", "func.return", "func.func", "builtin.module", "ft.fusion"}


def computed_ops(module: Module) -> Counter:
    return Counter(op.name for op in module.walk() if is_computed(op))


def derived_ops(region_ops: list[Operation]) -> list[Operation]:
    """The region's ops that depend on a computed op in it: the group's members (the rest are
    inputs' views, casts and constants, cloned in)."""
    derived: set[int] = set()
    for op in region_ops:
        if is_computed(op) or any(id(getattr(v, "op", None)) in derived for v in op.operands):
            derived.add(id(op))
    return [op for op in region_ops if id(op) in derived]


def reduced_dims(op: Operation) -> frozenset[int]:
    rank = op.operands[0].type.rank
    if "dims" in op.attributes:
        dims = op.attributes["dims"] or range(rank)
    else:
        dims = (op.attributes["dim"],)
    return frozenset(d % rank for d in dims) if rank else frozenset()


def allowed_shapes(shape: tuple, reduced: frozenset[int]) -> set[tuple]:
    keep = tuple(1 if i in reduced else d for i, d in enumerate(shape))
    drop = tuple(d for i, d in enumerate(shape) if i not in reduced)
    return {shape, keep, drop} if reduced else {shape}


def _is_splat(values: torch.Tensor) -> bool:
    """All elements equal (all NaN counts); fp8 tensors compare through f64 (torch has no fp8 unique)."""
    values = values.double() if values.is_floating_point() else values
    return values.unique().numel() <= 1 or bool(values.isnan().all())


def assert_group_invariants(fusion: Operation, max_ops: int, concat: bool) -> None:
    """The contract of a region the pass built (see the docstring of passes/fuse_elementwise.py)."""
    block = fusion.regions[0].block
    *body, terminator = block.ops
    assert terminator.name == "ft.yield"
    defined = {id(a) for a in block.args}
    for op in body:
        assert all(id(v) in defined for v in op.operands), f"region reads a value from outside: {op.name}"
        defined.update(id(r) for r in op.results)
        joins = concat and op.name == "ft.concat"
        assert (op.name not in NEVER_FUSED or joins) and not op.regions, f"{op.name} inside a fusion"
        if op.name == "ft.slice":
            assert op.attributes["step"] == 1
        if op.name == "ft.constant":
            data = op.attributes["value"]
            assert not isinstance(data, DenseAttr) or _is_splat(data.value), "a non-splat constant inside a fusion"
    reductions = [op for op in body if op.name in REDUCTIONS | ROW_REDUCTIONS]
    assert fusion.attributes["kind"] == ("reduction" if reductions else "elementwise")
    members = derived_ops(body)
    assert any(is_computed(op) for op in members)
    if max_ops:
        assert len(members) <= max_ops
    concats = [op for op in body if op.name == "ft.concat"]
    if concats:
        assert len(concats) == 1 and not reductions
        assert_concat_group(concats[0], members, terminator.operands)
        return
    if reductions:
        shape, reduced = reductions[0].operands[0].type.shape, reduced_dims(reductions[0])
        assert all(r.operands[0].type.shape == shape and reduced_dims(r) == reduced for r in reductions)
    else:
        shape, reduced = members[0].results[0].type.shape, frozenset()
    shapes = allowed_shapes(shape, reduced)
    assert all(op.results[0].type.shape in shapes for op in members)
    assert all(v.type.shape in shapes for v in terminator.operands)


def assert_concat_group(concat: Operation, members: list[Operation], yielded: list[Value]) -> None:
    """A concat group: the members computing operand i (piece i) have its shape, or, under a
    last reshape of size-1 dims, the shape before it; the others (the rest) have the concat's
    shape and read piece members only through the concat; every yielded value has one of
    those shapes."""
    member_ids = {id(op) for op in members}
    piece_ids: set[int] = set()
    shapes = {concat.results[0].type.shape}
    for operand in concat.operands:
        piece = upstream(operand, member_ids)
        piece_ids.update(id(op) for op in piece)
        allowed = {operand.type.shape}
        last = getattr(operand, "op", None)
        if last is not None and last.name == "ft.reshape" and id(last) in member_ids:
            before = last.operands[0].type.shape
            assert [d for d in before if d != 1] == [d for d in operand.type.shape if d != 1]
            allowed.add(before)
        assert all(op.results[0].type.shape in allowed for op in piece), "a piece member of another shape"
        shapes |= allowed
    for op in members:
        if id(op) in piece_ids:
            continue
        assert op.results[0].type.shape == concat.results[0].type.shape, "a member not of the concat's shape"
        if op is not concat:
            assert not any(id(getattr(v, "op", None)) in piece_ids for v in op.operands), "a piece read directly"
    assert all(v.type.shape in shapes for v in yielded)


def upstream(value: Value, member_ids: set[int]) -> list[Operation]:
    """The members `value` is computed from, its producer included."""
    found: dict[int, Operation] = {}
    pending = [value]
    while pending:
        producer = getattr(pending.pop(), "op", None)
        if producer is not None and id(producer) in member_ids and id(producer) not in found:
            found[id(producer)] = producer
            pending.extend(producer.operands)
    return list(found.values())


def check_fusion(module: Module, seed: int | None, max_ops: int = 0, concat: bool = False) -> None:
    """Run the pass on `module` and check everything a run must guarantee."""
    before = clone_module(module)
    existing = {id(op) for op in fusions(module)}
    fuse(module, max_ops, concat)
    verify(module)  # in particular: every value is defined before it is used, so no cycle
    for fusion in fusions(module):
        if id(fusion) not in existing:
            assert_group_invariants(fusion, max_ops, concat)
    assert computed_ops(module) == computed_ops(before), "a compute op was copied or dropped"
    assert not fuse(module, max_ops, concat), "a second run changed the IR"
    if seed is not None:
        assert_same_results(before, module, seed)


class Program:
    """A function built op by op with type inference: `p.op("ft.exp", x)`."""

    def __init__(self, *arg_types: TensorType | ScalarType):
        self.module = Module.empty()
        _, block = new_function(self.module, "main", list(arg_types))
        self.builder = Builder(block)
        self.args = list(block.args)

    def op(self, name: str, *operands: Value, result_type: Any = None, **attributes: Any) -> Value:
        return self.builder.value(name, *operands, result_type=result_type, **attributes)

    def constant(self, value: float, type_: TensorType | ScalarType = F32) -> Value:
        attr = DenseAttr(torch.full(type_.shape, value, dtype=type_.dtype.torch_dtype)) \
            if isinstance(type_, TensorType) else value
        return self.op("ft.constant", result_type=type_, value=attr)

    def returns(self, *values: Value) -> Module:
        self.builder.create("func.return", list(values), {}, [])
        verify(self.module)
        return self.module


def tensor(*shape: int, dtype: str = "f32") -> TensorType:
    return TensorType(tuple(shape), ScalarType(dtype))


def rms_norm(rows: int, dim: int, dtype: str, keepdim: bool, residual: bool) -> Module:
    """y = (x [+ r]) * rsqrt(mean(x², -1) + eps) * w, computed in f32, as the importer writes it."""
    p = Program(tensor(rows, dim, dtype=dtype), tensor(rows, dim, dtype=dtype), tensor(dim, dtype=dtype))
    x, r, w = p.args
    if residual:
        x = p.op("ft.add", x, r)
    xf = p.op("ft.cast", x, result_type=tensor(rows, dim))
    mean = p.op("ft.mean", p.op("ft.mul", xf, xf), dims=(-1,), keepdim=keepdim)
    if not keepdim:
        mean = p.op("ft.reshape", mean, result_type=tensor(rows, 1))
    inv = p.op("ft.rsqrt", p.op("ft.add", mean, p.constant(1e-6)))
    normed = p.op("ft.cast", p.op("ft.mul", xf, inv), result_type=tensor(rows, dim, dtype=dtype))
    return p.returns(p.op("ft.mul", normed, w))


# ---------------------------------------------------------------- structure


@given(st.integers(1, 9), st.integers(1, 40), st.sampled_from(["f32", "bf16", "f16"]), st.booleans(), st.booleans(),
       seeds())
def test_rms_norm_becomes_one_reduction_group(rows, dim, dtype, keepdim, residual, seed):
    module = rms_norm(rows, dim, dtype, keepdim, residual)
    check_fusion(module, seed)
    assert top_level_names(module) == ["ft.fusion", "func.return"]
    assert fusions(module)[0].attributes["kind"] == "reduction"


def scaled_softmax(shape: tuple[int, ...], dim: int, written_out: bool) -> Module:
    """softmax(x * scale) along `dim`, as one op or as max/sub/exp/sum/div."""
    p = Program(tensor(*shape))
    scaled = p.op("ft.mul", p.args[0], p.constant(0.125))
    if not written_out:
        return p.returns(p.op("ft.softmax", scaled, result_type=tensor(*shape), dim=dim))
    shifted = p.op("ft.sub", scaled, p.op("ft.amax", scaled, dims=(dim,), keepdim=True))
    exp = p.op("ft.exp", shifted)
    return p.returns(p.op("ft.div", exp, p.op("ft.sum", exp, dims=(dim,), keepdim=True)))


@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.data(), st.booleans(), seeds())
def test_softmax_and_scale_become_one_group(shape, data, written_out, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    module = scaled_softmax(tuple(shape), dim, written_out)
    check_fusion(module, seed)
    assert top_level_names(module) == ["ft.fusion", "func.return"]


def test_matmul_stays_outside_and_its_epilogue_is_one_group_after_it():
    p = Program(tensor(4, 8), tensor(8, 6), tensor(6), tensor(4, 6))
    x, w, bias, residual = p.args
    out = p.op("ft.add", p.op("ft.gelu", p.op("ft.add", p.op("ft.matmul", p.op("ft.tanh", x), w), bias)), residual)
    module = p.returns(out)
    check_fusion(module, seed=0)
    assert top_level_names(module) == ["ft.fusion", "ft.matmul", "ft.fusion", "func.return"]
    prologue, epilogue = fusions(module)
    assert [op.name for op in epilogue.regions[0].block.ops] == ["ft.add", "ft.gelu", "ft.add", "ft.yield"]
    assert [op.name for op in prologue.regions[0].block.ops] == ["ft.tanh", "ft.yield"]


def test_no_group_reads_what_it_produces_through_an_outside_op():
    """exp feeds the matmul and, with the matmul's result, the add: one group holding both
    the exp and the add would wait for the matmul that waits for it."""
    p = Program(tensor(4, 4), tensor(4, 4))
    x, w = p.args
    exp = p.op("ft.exp", x)
    module = p.returns(p.op("ft.tanh", p.op("ft.add", exp, p.op("ft.matmul", exp, w))))
    check_fusion(module, seed=0)
    assert top_level_names(module) == ["ft.fusion", "ft.matmul", "ft.fusion", "func.return"]
    first, second = fusions(module)
    matmul = module.function("main").regions[0].block.ops[1]
    assert matmul.operands[0] is first.results[0] and second.operands == [first.results[0], matmul.results[0]]


def test_a_path_through_a_third_group_also_blocks_a_merge():
    """The column group C reads the row max `a` (of group A) in one member and feeds `b` from
    another: no op-level path leads from A to b through C, but C runs as one unit, so a
    group holding A and b would both feed C and wait for it."""
    p = Program(tensor(3, 5), tensor(3, 5))
    x, y = p.args
    e = p.op("ft.exp", x)
    a = p.op("ft.amax", e, dims=(1,), keepdim=True)  # group A: reduces the rows
    c2 = p.op("ft.sum", y, dims=(0,), keepdim=True)  # group C: reduces the columns
    c1 = p.op("ft.mul", c2, a)  # joins C, reads A
    b = p.op("ft.add", e, c2)  # reads A (e) and C (c2)
    module = p.returns(c1, b)
    check_fusion(module, seed=1)
    regions = [[op.name for op in f.regions[0].block.ops] for f in fusions(module)]
    assert regions == [["ft.exp", "ft.amax", "ft.yield"], ["ft.sum", "ft.mul", "ft.add", "ft.yield"]]


def test_cheap_ops_are_repeated_and_heavy_ops_yielded():
    p = Program(tensor(4, 4, dtype="f16"), tensor(4, 4))
    x, w = p.args
    xf = p.op("ft.cast", x, result_type=tensor(4, 4))  # cheap: read by the matmul and by a group
    exp = p.op("ft.exp", xf)  # heavy: read by the matmul and by the group
    module = p.returns(p.op("ft.matmul", xf, w), p.op("ft.matmul", exp, w), p.op("ft.tanh", exp))
    check_fusion(module, seed=2)
    block = module.function("main").regions[0].block
    (group,) = fusions(module)
    region_names = [op.name for op in group.regions[0].block.ops]
    assert region_names == ["ft.cast", "ft.exp", "ft.tanh", "ft.yield"]
    assert [op.name for op in block.ops].count("ft.cast") == 1, "the matmul keeps its own cast"
    assert len(group.results) == 2, "exp is yielded to the matmul, tanh to the return"
    assert group.operands == [x], "the group casts the input itself"


def test_each_reduction_dim_set_gets_its_own_group():
    p = Program(tensor(3, 5))
    exp = p.op("ft.exp", p.args[0])
    module = p.returns(p.op("ft.sum", exp, dims=(1,), keepdim=False), p.op("ft.sum", exp, dims=(0,), keepdim=False))
    check_fusion(module, seed=3)
    assert [f.attributes["kind"] for f in fusions(module)] == ["reduction", "reduction"]
    assert computed_ops(module)["ft.exp"] == 1


@pytest.mark.parametrize("keepdim", [False, True])
def test_reduced_values_are_read_only_at_their_own_row(keepdim):
    """Row sums of a square matrix without keepdim broadcast along the last dim: element
    (i, j) reads sum j, which a row-by-row kernel has not computed yet."""
    p = Program(tensor(4, 4))
    x = p.args[0]
    module = p.returns(p.op("ft.add", x, p.op("ft.sum", x, dims=(1,), keepdim=keepdim)))
    check_fusion(module, seed=4)
    assert len(fusions(module)) == (1 if keepdim else 2)


def test_a_transposed_computed_value_is_read_from_memory():
    """t[i, j] = exp(x)[j, i]: a kernel computing exp(x) tile by tile has not computed
    element (j, i) when it needs it, so the transpose reads the first group's result."""
    p = Program(tensor(4, 4))
    x = p.args[0]
    module = p.returns(p.op("ft.add", p.op("ft.transpose", p.op("ft.exp", x), perm=(1, 0)), x))
    check_fusion(module, seed=7)
    regions = [[op.name for op in f.regions[0].block.ops] for f in fusions(module)]
    assert regions == [["ft.exp", "ft.yield"], ["ft.transpose", "ft.add", "ft.yield"]]


def test_views_of_inputs_fold_in_and_strided_slices_stay_out():
    p = Program(tensor(8, 4), tensor(4, 16))
    a, b = p.args
    at = p.op("ft.transpose", a, perm=(1, 0))
    head = p.op("ft.slice", b, dim=1, start=0, end=8, step=1)
    even = p.op("ft.slice", b, dim=1, start=0, end=16, step=2)
    total = p.op("ft.mul", p.op("ft.add", at, head), even)
    flat = p.op("ft.reshape", total, result_type=tensor(32))  # merges dims of a computed value
    module = p.returns(p.op("ft.exp", flat))
    check_fusion(module, seed=5)
    assert top_level_names(module) == ["ft.slice", "ft.fusion", "ft.fusion", "func.return"]
    first, second = ([op.name for op in f.regions[0].block.ops] for f in fusions(module))
    assert first == ["ft.transpose", "ft.slice", "ft.add", "ft.mul", "ft.yield"]
    assert second == ["ft.reshape", "ft.exp", "ft.yield"], "the reshape reads the first group's result"


@given(st.integers(1, 12), st.integers(1, 5), seeds())
def test_max_ops_bounds_every_group(length, max_ops, seed):
    p = Program(tensor(8))
    value = p.args[0]
    for index in range(length):
        value = p.op(("ft.tanh", "ft.sin", "ft.neg")[index % 3], value)
    module = p.returns(value)
    check_fusion(module, seed, max_ops)
    assert len(fusions(module)) == math.ceil(length / max_ops)


def test_dead_ops_are_left_for_dce():
    p = Program(tensor(4))
    x = p.args[0]
    p.op("ft.exp", x)  # nothing reads it
    module = p.returns(p.op("ft.tanh", x))
    check_fusion(module, seed=6)
    assert top_level_names(module) == ["ft.exp", "ft.fusion", "func.return"]


def rotary(seq: int, half: int, interleaved: bool) -> Module:
    """Rotary on (2, seq, 3, 2*half), as the importer writes examples/zoo.py's Rotary: halves
    joined by a concat, or (interleaved) adjacent pairs by a stack, then flattened."""
    width = 2 * half
    p = Program(tensor(2, seq, 3, width), tensor(seq, 1, half), tensor(seq, 1, half))
    x, cos, sin = p.args
    quarter = tensor(2, seq, 3, half)
    if interleaved:
        pairs = p.op("ft.reshape", x, result_type=tensor(2, seq, 3, half, 2))
        x0, x1 = (p.op("ft.reshape", p.op("ft.slice", pairs, dim=4, start=k, end=k + 1, step=1), result_type=quarter)
                  for k in (0, 1))
    else:
        x0, x1 = (p.op("ft.slice", x, dim=3, start=k * half, end=(k + 1) * half, step=1) for k in (0, 1))
    first = p.op("ft.sub", p.op("ft.mul", x0, cos), p.op("ft.mul", x1, sin))
    second = p.op("ft.add", p.op("ft.mul", x0, sin), p.op("ft.mul", x1, cos))
    if not interleaved:
        return p.returns(p.op("ft.concat", first, second, dim=3))
    pieces = [p.op("ft.reshape", v, result_type=tensor(2, seq, 3, half, 1)) for v in (first, second)]
    return p.returns(p.op("ft.reshape", p.op("ft.concat", *pieces, dim=4), result_type=tensor(2, seq, 3, width)))


@given(st.integers(1, 9), st.integers(1, 9), st.booleans(), seeds())
def test_a_rotary_with_its_concat_becomes_one_group(seq, half, interleaved, seed):
    module = rotary(seq, half, interleaved)
    check_fusion(module, seed, concat=True)
    flatten = ["ft.reshape"] if interleaved else []
    assert top_level_names(module) == ["ft.fusion", *flatten, "func.return"]
    (group,) = fusions(module)
    assert [op.name for op in group.regions[0].block.ops].count("ft.concat") == 1


@pytest.mark.parametrize("interleaved", [False, True])
def test_without_the_option_a_concat_joins_no_group(interleaved):
    module = rotary(5, 4, interleaved)
    check_fusion(module, seed=8)
    assert top_level_names(module).count("ft.concat") == 1
    assert len(fusions(module)) == 2


def test_a_concat_of_a_reduction_stays_outside():
    """A concat group holds no reduction: a softmax's result is joined after its kernel."""
    p = Program(tensor(4, 6), tensor(4, 2))
    x, y = p.args
    module = p.returns(p.op("ft.concat", p.op("ft.softmax", x, dim=1), p.op("ft.exp", y), dim=1))
    check_fusion(module, seed=9, concat=True)
    assert top_level_names(module) == ["ft.fusion", "ft.fusion", "func.return"]
    names = [[op.name for op in f.regions[0].block.ops] for f in fusions(module)]
    assert names == [["ft.softmax", "ft.yield"], ["ft.exp", "ft.concat", "ft.yield"]]


def test_a_member_reading_a_piece_directly_is_not_in_the_concat_group():
    """cat(a, b) * a: the multiply walks the concat's shape and would read piece `a` at points
    of the other piece, so it is not grouped with the concat."""
    p = Program(tensor(4, 1), tensor(4, 3))
    x, y = p.args
    a = p.op("ft.exp", x)
    joined = p.op("ft.concat", a, p.op("ft.tanh", y), dim=1)
    module = p.returns(p.op("ft.mul", joined, a))
    check_fusion(module, seed=10, concat=True)
    for fusion in fusions(module):
        names = [op.name for op in fusion.regions[0].block.ops]
        assert not ("ft.concat" in names and "ft.mul" in names)


def test_negative_max_ops_is_an_error():
    with pytest.raises(OptionsError, match="max-ops"):
        parse_pipeline("fuse-elementwise{max-ops=-1}")


# ---------------------------------------------------------------- random programs


@given(runnable_modules(max_ops=12), seeds(), st.sampled_from([0, 1, 2, 3]), st.booleans())
def test_random_modules_keep_their_results_and_the_group_invariants(module, seed, max_ops, concat):
    check_fusion(module, seed, max_ops, concat)


@given(modules(max_ops=10), st.booleans())
def test_any_module_stays_valid_and_prints_back(module, concat):
    """Dynamic shapes, every element type, existing fusions, symbolic sizes."""
    check_fusion(module, seed=None, concat=concat)
    text = print_module(module)
    assert print_module(parse_module(text)) == text


@given(runnable_modules(max_ops=10))
def test_the_output_depends_only_on_the_input(module):
    twin = clone_module(module)
    fuse(module)
    fuse(twin)
    assert print_module(module) == print_module(twin)


@st.composite
def row_programs(draw) -> Module:
    """Chains over one matrix shape, rich in what the pass groups: elementwise ops with
    broadcast operands, reductions over the same or other dims (with and without keepdim),
    softmax, casts, views of reduced values, and matmuls and top-k in between.  Square
    shapes come often, where a reduced value can broadcast along the wrong dim."""
    rows = draw(st.integers(1, 5))
    cols = draw(st.sampled_from([rows, draw(st.integers(1, 5))]))
    p = Program(tensor(rows, cols), tensor(rows, cols), tensor(cols), tensor(rows, 1), tensor(cols, rows))
    pool = list(p.args)
    full = tensor(rows, cols)
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "softmax", "cast", "view", "concat",
                                     "barrier"]))
        matrices = [v for v in pool if v.type.shape == (rows, cols)]
        if kind == "unary":
            name = draw(st.sampled_from(["ft.tanh", "ft.sigmoid", "ft.neg", "ft.abs", "ft.silu", "ft.exp"]))
            pool.append(p.op(name, draw(st.sampled_from(pool))))
        elif kind == "binary":
            left = draw(st.sampled_from(pool))
            partners = [v for v in pool if _broadcastable(v.type.shape, left.type.shape)]
            name = draw(st.sampled_from(["ft.add", "ft.sub", "ft.mul", "ft.maximum"]))
            pool.append(p.op(name, left, draw(st.sampled_from(partners))))
        elif kind == "reduce":
            name = draw(st.sampled_from(["ft.sum", "ft.amax", "ft.mean", "ft.amin"]))
            dims = draw(st.sampled_from([(1,), (1,), (-1,), (0,), (0, 1)]))
            pool.append(p.op(name, draw(st.sampled_from(matrices)), dims=dims, keepdim=draw(st.booleans())))
        elif kind == "softmax":
            name = draw(st.sampled_from(["ft.softmax", "ft.log_softmax"]))
            dim = draw(st.sampled_from([0, 1]))
            pool.append(p.op(name, draw(st.sampled_from(matrices)), result_type=full, dim=dim))
        elif kind == "cast":
            value = draw(st.sampled_from(pool))
            narrow = p.op("ft.cast", value, result_type=value.type.with_dtype(ScalarType("bf16")))
            pool.append(p.op("ft.cast", narrow, result_type=value.type))
        elif kind == "view":
            pool.append(_draw_view(draw, p, pool, rows, cols))
        elif kind == "concat":
            pool.append(_draw_concat(draw, p, matrices, rows, cols))
        else:
            value = draw(st.sampled_from(matrices))
            if draw(st.booleans()):
                pool.append(p.op("ft.matmul", value, p.op("ft.transpose", value, perm=(1, 0))))
            else:
                top = p.builder.create("ft.topk", [value], {"k": 1, "dim": 1, "largest": True, "sorted": True})
                pool.append(top.results[0])
    returned = [pool[-1], *draw(st.lists(st.sampled_from(pool[5:] or pool), max_size=2))]
    return p.returns(*returned)


def _broadcastable(shape: tuple, into: tuple) -> bool:
    if len(shape) > len(into):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], into[::-1]))


def _draw_view(draw, p: Program, pool: list[Value], rows: int, cols: int) -> Value:
    """A view the pass may fold: broadcast a column back over the rows, add or drop a size-1
    dim, transpose, or take a step-1 slice."""
    columns = [v for v in pool if v.type.shape == (rows, 1)]
    vectors = [v for v in pool if v.type.shape == (rows,)]
    choice = draw(st.sampled_from(["broadcast", "unsqueeze", "transpose", "slice"]))
    if choice == "broadcast" and columns:
        value = draw(st.sampled_from(columns))
        return p.op("ft.broadcast_to", value, result_type=tensor(rows, cols, dtype=value.type.dtype.name))
    if choice == "unsqueeze" and vectors:
        value = draw(st.sampled_from(vectors))
        return p.op("ft.reshape", value, result_type=tensor(rows, 1, dtype=value.type.dtype.name))
    transposable = [v for v in pool if v.type.rank == 2]
    value = draw(st.sampled_from(transposable))
    if choice == "slice":
        return p.op("ft.slice", value, dim=1, start=0, end=draw(st.integers(1, 5)), step=1)
    return p.op("ft.transpose", value, perm=(1, 0))


def _draw_concat(draw, p: Program, matrices: list[Value], rows: int, cols: int) -> Value:
    """A concat of two matrices along either dim, of two slices of them back into one matrix
    (slices of computed values are not views a group folds), or a stack of them."""
    first, second = draw(st.sampled_from(matrices[2:] or matrices)), draw(st.sampled_from(matrices))  # 2 inputs
    choice = draw(st.sampled_from(["join", "split", "stack"]))
    if choice == "join":
        return p.op("ft.concat", first, second, dim=draw(st.sampled_from([0, 1, -1])))
    if choice == "split" and cols > 1:
        k = draw(st.integers(1, cols - 1))
        head = p.op("ft.slice", first, dim=1, start=0, end=k, step=1)
        return p.op("ft.concat", head, p.op("ft.slice", second, dim=1, start=k, end=cols, step=1), dim=1)
    pieces = [p.op("ft.reshape", v, result_type=tensor(rows, cols, 1)) for v in (first, second)]
    return p.op("ft.concat", *pieces, dim=2)


@given(row_programs(), seeds(), st.sampled_from([0, 0, 2, 5]), st.booleans())
def test_row_programs_keep_their_results_and_the_group_invariants(module, seed, max_ops, concat):
    check_fusion(module, seed, max_ops, concat)
