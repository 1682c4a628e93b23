"""fuse-gather-matmul (passes/fuse_gather_matmul.py) and the cpu kernel of ft.gather_matmul
(backends/cpu/gather_matmul.py): the rewrite keeps semantics on random shapes and indices (negative
ones too), folds nn.Linear-layout weights (transpose_w) and repeated tokens (x_repeat) into the op,
leaves near misses alone, and the kernel matches fp64 in both layouts without copying weights or x."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flagtree
from examples.zoo import ZOO
from flagtree.backends.cpu import CpuBackend, gather_matmul
from flagtree.backends.cpu.compiler import compile_op
from flagtree.backends.cpu.host import host_cpu
from flagtree.backends.cpu.kernel import KernelCallError
from flagtree.backends.interpret import InterpretBackend
from flagtree.backends.reference import run_module
from flagtree.backends.reference.executor import ExecutionError
from flagtree.errors import VerificationError
from flagtree.ir import Builder, Module, Value, new_function, verify
from flagtree.ir.parser import clone_module, parse_module
from flagtree.ir.printer import print_module
from flagtree.ir.types import ScalarType, TensorType
from flagtree.passes.fuse_gather_matmul import FuseGatherMatmul
from tests.frontend_helpers import TOLERANCE, relative_error

TOLERANCES = {**TOLERANCE, torch.float16: 2e-3}
SIZES = (1, 2, 3, 16, 17)


def gathered_matmul(batch: int | None, m: int, k: int, n: int, experts: int, dtype: str = "f32",
                    transposed: bool = True, index_dtype: str = "i64", returns_gather: bool = False,
                    x_repeat: int = 1) -> Module:
    """@main(x, w, index [B]) = x @ w[index] (w [E, N, K] read transposed, as an MoE's nn.Linear-layout
    experts are, or w [E, K, N] as it is), and w[index] too if `returns_gather`.  x is [B, M, K], or
    with x_repeat > 1 [B / x_repeat, M, K] repeated as FTIR spells x.repeat_interleave(x_repeat, 0)."""
    element = ScalarType(dtype)
    w_shape = (experts, n, k) if transposed else (experts, k, n)
    entries = None if batch is None else batch // x_repeat
    module = Module.empty()
    _, block = new_function(module, "main", [TensorType((entries, m, k), element), TensorType(w_shape, element),
                                             TensorType((batch,), ScalarType(index_dtype))])
    x, w, index = block.args
    b = Builder(block)
    if x_repeat > 1:
        x = repeat_interleave(b, x, x_repeat, index)
    gathered = b.value("ft.index", w, index, dims=(0,), result_type=TensorType((batch, *w_shape[1:]), element))
    right = b.value("ft.transpose", gathered, perm=(0, 2, 1)) if transposed else gathered
    b.create("func.return", [b.value("ft.matmul", x, right), *[gathered] * returns_gather])
    verify(module)
    return module


def repeat_interleave(b: Builder, x: Value, times: int, index: Value) -> Value:
    """x [N, M, K] repeated `times` times along dim 0 as the importer writes it (SmallMoE's
    `x.repeat_interleave(k, 0)`): reshape to [N, 1, M·K], broadcast to [N, times, M·K], reshape
    to [N·times, M, K] (sizes from ft.dim when N is dynamic)."""
    entries, m, k = x.type.shape
    sizes = [b.value("ft.dim", x, dim=0)] if entries is None else []
    flat = b.value("ft.reshape", x, *sizes, result_type=TensorType((entries, 1, m * k), x.type.dtype))
    grown = b.value("ft.broadcast_to", flat, *sizes, result_type=TensorType((entries, times, m * k), x.type.dtype))
    batch = index.type.shape[0]
    rows = [b.value("ft.dim", index, dim=0)] if batch is None else []
    return b.value("ft.reshape", grown, *rows, result_type=TensorType((batch, m, k), x.type.dtype))


def inputs_for(module: Module, batch: int, seed: int, x_repeat: int = 1) -> list[torch.Tensor]:
    """Random x (batch / x_repeat entries when x_repeat > 1) and w, and an index of every entry
    kind: -E ... E - 1."""
    generator = torch.Generator().manual_seed(seed)
    x_type, w_type, index_type = (a.type for a in module.function().regions[0].block.args)
    experts = w_type.shape[0]
    entries = batch // x_repeat if x_type.shape[0] is None else x_type.shape[0]
    x = torch.randn((entries, *x_type.shape[1:]), generator=generator).to(x_type.dtype.torch_dtype)
    w = torch.randn(w_type.shape, generator=generator).to(w_type.dtype.torch_dtype)
    index = torch.randint(-experts, experts, (batch,), generator=generator).to(index_type.dtype.torch_dtype)
    return [x, w, index]


def fp64_truth(module: Module, inputs: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """The module's result (all of them when it has several) on `inputs` in fp64."""
    results = run_module(module, [t.double() if t.is_floating_point() else t for t in inputs])
    return results[0] if len(results) == 1 else results


def op_names(module: Module) -> list[str]:
    return [op.name for op in module.function().regions[0].block.ops]


# ---------------------------------------------------------------------- the pass
def gather_matmuls(module: Module) -> list:
    return [op for op in module.function().regions[0].block.ops if op.name == "ft.gather_matmul"]


@settings(max_examples=30, deadline=None)
@given(entries=st.sampled_from(SIZES), m=st.sampled_from((1, 3)), k=st.sampled_from(SIZES),
       n=st.sampled_from(SIZES), experts=st.sampled_from((1, 3, 8)), dtype=st.sampled_from(("f32", "bf16")),
       transposed=st.booleans(), index_dtype=st.sampled_from(("i64", "i32")), x_repeat=st.sampled_from((1, 2, 3)),
       dynamic=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_rewrite_keeps_semantics(entries, m, k, n, experts, dtype, transposed, index_dtype, x_repeat, dynamic,
                                     seed):
    batch = entries * x_repeat
    before = gathered_matmul(None if dynamic else batch, m, k, n, experts, dtype, transposed, index_dtype,
                             x_repeat=x_repeat)
    after = clone_module(before)
    assert FuseGatherMatmul().run(after)
    verify(after)
    (fused,) = gather_matmuls(after)
    assert fused.attributes.get("transpose_w", False) == transposed
    assert fused.attributes.get("x_repeat", 1) == x_repeat
    assert not {"ft.index", "ft.transpose", "ft.broadcast_to", "ft.matmul"} & set(op_names(after)), \
        "the gather, the transpose and the repeat are gone"
    inputs = inputs_for(before, batch, seed, x_repeat)
    truth = fp64_truth(before, inputs)
    tolerance = TOLERANCES[inputs[0].dtype]
    (rewritten,) = run_module(after, inputs)
    (original,) = run_module(before, inputs)
    assert rewritten.dtype == original.dtype and rewritten.shape == original.shape
    assert relative_error(rewritten, truth) <= tolerance
    assert relative_error(original, truth) <= tolerance


def test_a_gather_that_something_else_reads_stays():
    module = gathered_matmul(5, 1, 4, 6, 3, returns_gather=True)
    inputs = inputs_for(module, 5, seed=3)
    before = run_module(module, inputs)
    assert FuseGatherMatmul().run(module)
    verify(module)
    assert op_names(module).count("ft.index") == 1 and "ft.gather_matmul" in op_names(module)
    after = run_module(module, inputs)
    assert torch.equal(after[1], before[1])
    assert relative_error(after[0], fp64_truth(module, inputs)[0]) <= 1e-5


def _near_miss(build) -> Module:
    """@main(x [4, 2, 4], w [4, 4, 5], index [4], x1 [1, 2, 4], y [4, 5, 3]) returning `build`'s value."""
    module = Module.empty()
    f32 = ScalarType("f32")
    shapes = ((4, 2, 4), (4, 4, 5), (4,), (1, 2, 4), (4, 5, 3))
    types = [TensorType(shape, ScalarType("i64") if len(shape) == 1 else f32) for shape in shapes]
    _, block = new_function(module, "main", types)
    b = Builder(block)
    b.create("func.return", [build(b, *block.args)])
    verify(module)
    return module


def _gather(b: Builder, w: Value, index: Value, dim: int = 0) -> Value:
    shape = list(w.type.shape)
    shape[dim] = index.type.shape[0]
    return b.value("ft.index", w, index, dims=(dim,), result_type=TensorType(tuple(shape), w.type.dtype))


NEAR_MISSES = {
    "gather along dim 1": lambda b, x, w, idx, x1, y: b.value("ft.matmul", x, _gather(b, w, idx, dim=1)),
    "transpose moves the gathered dim": lambda b, x, w, idx, x1, y: b.value(
        "ft.matmul", x, b.value("ft.transpose", _gather(b, w, idx), perm=(1, 0, 2))),
    "x's batch broadcasts": lambda b, x, w, idx, x1, y: b.value("ft.matmul", x1, _gather(b, w, idx)),
    "gathered operand on the left": lambda b, x, w, idx, x1, y: b.value("ft.matmul", _gather(b, w, idx), y),
}


def test_the_near_miss_harness_builds_the_pattern_itself():
    """The near misses differ from a match only in the property each names."""
    assert FuseGatherMatmul().run(_near_miss(lambda b, x, w, idx, x1, y: b.value("ft.matmul", x, _gather(b, w, idx))))


def _repeat_near_miss(build) -> Module:
    """@main(x [6, 4], w [3, 4, 5], index [12]) = gather_matmul(build(x) [12, 1, 4], w[index])."""
    module = Module.empty()
    f32 = ScalarType("f32")
    _, block = new_function(module, "main", [TensorType((6, 4), f32), TensorType((3, 4, 5), f32),
                                             TensorType((12,), ScalarType("i64"))])
    x, w, index = block.args
    b = Builder(block)
    tokens = build(b, x)
    b.create("func.return", [b.value("ft.gather_matmul", tokens, w, index)])
    verify(module)
    return module


def _view(b: Builder, x: Value, *shape: int) -> Value:
    return b.value("ft.reshape", x, result_type=TensorType(shape, x.type.dtype))


def _grown(b: Builder, x: Value, *shape: int) -> Value:
    return b.value("ft.broadcast_to", x, result_type=TensorType(shape, x.type.dtype))


REPEAT_NEAR_MISSES = {
    # each element repeated within its entry (x.repeat_interleave(2, -1)), not each entry
    "elements repeated": lambda b, x: _view(b, _grown(b, _view(b, x, 6, 4, 1), 6, 4, 2), 12, 1, 4),
    # the whole of x repeated (x.repeat(2, 1)): entry b is x[b % 6], not x[b // 2]
    "x tiled": lambda b, x: _view(b, _grown(b, _view(b, x, 1, 6, 4), 2, 6, 4), 12, 1, 4),
    # a reshape that splits entries: x[b] is half of a repeated pair of rows
    "entries split": lambda b, x: _view(b, _grown(b, _view(b, x, 3, 1, 8), 3, 2, 8), 12, 1, 4),
}


def test_the_repeat_near_miss_harness_builds_the_pattern_itself():
    module = _repeat_near_miss(lambda b, x: _view(b, _grown(b, _view(b, x, 6, 1, 4), 6, 2, 4), 12, 1, 4))
    assert FuseGatherMatmul().run(module)
    assert gather_matmuls(module)[0].attributes == {"x_repeat": 2}


NEAR_MISS_MODULES = {
    **{name: functools.partial(_near_miss, build) for name, build in NEAR_MISSES.items()},
    **{name: functools.partial(_repeat_near_miss, build) for name, build in REPEAT_NEAR_MISSES.items()},
}


@pytest.mark.parametrize("name", list(NEAR_MISS_MODULES))
def test_near_misses_are_left_alone(name):
    module = NEAR_MISS_MODULES[name]()
    text = print_module(module)
    assert not FuseGatherMatmul().run(module)
    assert print_module(module) == text


def test_only_a_swap_of_the_last_two_weight_dims_folds_into_transpose_w():
    """An identity perm stays an explicit ft.transpose; a [0, 2, 1] of weights already read
    transposed cancels it (transpose_w back to its default, which is not printed)."""
    module = _near_miss(lambda b, x, w, idx, x1, y: b.value(
        "ft.matmul", x, b.value("ft.transpose", _gather(b, w, idx), perm=(0, 1, 2))))
    assert FuseGatherMatmul().run(module)
    assert "ft.transpose" in op_names(module) and gather_matmuls(module)[0].attributes == {}
    f32 = ScalarType("f32")
    module = Module.empty()
    _, block = new_function(module, "main", [TensorType((4, 2, 4), f32), TensorType((3, 4, 5), f32),
                                             TensorType((4,), ScalarType("i64"))])
    x, w, index = block.args
    b = Builder(block)
    swapped = b.value("ft.transpose", w, perm=(0, 2, 1))
    b.create("func.return", [b.value("ft.gather_matmul", x, swapped, index, transpose_w=True)])
    inputs = inputs_for(module, 4, seed=5)
    before = run_module(module, inputs)
    assert FuseGatherMatmul().run(module)
    verify(module)
    (fused,) = gather_matmuls(module)
    assert fused.operands[1] is w and fused.attributes == {}
    assert op_names(module) == ["ft.gather_matmul", "func.return"]
    assert torch.equal(run_module(module, inputs)[0], before[0])


# ---------------------------------------------------------------------- the op
def _gather_matmul_problem(x: tuple, w: tuple, index: tuple, **attributes) -> str:
    """The verifier's message for an ft.gather_matmul of these operand shapes (f32, i64 index)."""
    f32 = ScalarType("f32")
    module = Module.empty()
    types = [TensorType(x, f32), TensorType(w, f32), TensorType(index, ScalarType("i64"))]
    _, block = new_function(module, "main", types)
    b = Builder(block)
    b.create("func.return", [b.value("ft.gather_matmul", *block.args, result_type=TensorType((4, 1, 5), f32),
                                     **attributes)])
    with pytest.raises(VerificationError) as error:
        verify(module)
    return str(error.value)


@pytest.mark.parametrize(("x", "w", "index", "attributes", "message"), [
    ((2, 1, 4), (3, 4, 5), (4,), {"x_repeat": 3}, r"batch dims differ: x .* \(x_repeat 3\)"),
    ((4, 1, 4), (3, 4, 5), (4,), {"transpose_w": True}, r"contraction dims differ: .*\(transpose_w True\)"),
    ((4, 1, 4), (3, 4, 5), (4,), {"x_repeat": 0}, "x_repeat must be at least 1"),
    ((4, 1, 4), (3, 4, 5), (4,), {"x_repeat": True}, "attribute 'x_repeat' must be int"),
    ((4, 1), (3, 5, 4), (4,), {"transpose_w": True}, r"needs x \[B, M, K\], w \[E, N, K\]"),
])
def test_the_verifier_names_what_is_wrong(x, w, index, attributes, message):
    assert re.search(message, _gather_matmul_problem(x, w, index, **attributes))


# ---------------------------------------------------------------------- the cpu kernel
def _compiled(module: Module, backend=None):
    backend = backend or CpuBackend()
    lowered = clone_module(module)
    FuseGatherMatmul().run(lowered)
    return backend.compile(lowered, backend.capabilities())


# (batch, M, K, N, experts, x_repeat): sizes below, at and past a vector of lanes (16 f32 / 32 bf16 on
# AVX-512) in K and N, so the kernel's whole chunks, masked tails and left-over columns all run.
KERNEL_SHAPES = [(1, 1, 1, 1, 1, 1), (33, 1, 17, 5, 3, 1), (14, 3, 33, 33, 8, 2), (66, 2, 32, 64, 8, 3),
                 (64, 1, 64, 19, 5, 2)]


@pytest.mark.mlir
@pytest.mark.parametrize("transposed", [True, False], ids=["transpose_w", "w_as_is"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_fp64_and_copies_nothing(shape, dtype, transposed, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    batch, m, k, n, experts, x_repeat = shape
    module = gathered_matmul(None, m, k, n, experts, dtype, transposed, x_repeat=x_repeat)  # one kernel per batch
    plan = _compiled(module)
    assert "fused_gather_matmul(" in plan.source and not plan.fallback_ops
    assert not {"index_select", "permute", "expand"} & set(re.findall(r"\w+", plan.source)), "nothing is copied"
    for seed, entries in enumerate((batch // x_repeat, 2 * (batch // x_repeat) + 1)):
        inputs = inputs_for(module, entries * x_repeat, seed, x_repeat)
        (got,) = plan(*inputs)
        (eager,) = run_module(module, inputs)
        truth = fp64_truth(module, inputs)
        assert got.dtype == eager.dtype and got.shape == eager.shape
        # Narrow floats: no worse than eager's own rounding (it also accumulates in f32, in another order).
        allowed = max(TOLERANCES[got.dtype], 2 * relative_error(eager, truth))
        assert relative_error(got, truth) <= allowed


@pytest.mark.mlir
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_one_kernel_serves_every_size_when_all_are_dynamic(dtype):
    """x [?, 2, ?], w [?, ?, ?] read transposed, an i32 index [?]: the dot products' chunk and column
    counts come from the call's sizes (here below, at and past a chunk of k and a block of columns)."""
    element = ScalarType(dtype)
    module = Module.empty()
    _, block = new_function(module, "main", [TensorType((None, 2, None), element),
                                             TensorType((None, None, None), element),
                                             TensorType((None,), ScalarType("i32"))])
    b = Builder(block)
    b.create("func.return", [b.value("ft.gather_matmul", *block.args, transpose_w=True, x_repeat=3)])
    verify(module)
    kernel = compile_op(gather_matmuls(module)[0])
    generator = torch.Generator().manual_seed(7)
    for entries, k, n, experts in ((5, 37, 41, 3), (2, 64, 16, 2), (1, 1, 1, 1)):
        x, w = (torch.randn(shape, generator=generator).to(element.torch_dtype)
                for shape in ((entries, 2, k), (experts, n, k)))
        index = torch.randint(-experts, experts, (3 * entries,), generator=generator, dtype=torch.int32)
        (got,) = kernel(x, w, index)
        (eager,) = run_module(module, [x, w, index])
        truth = fp64_truth(module, [x, w, index])
        assert relative_error(got, truth) <= max(TOLERANCES[got.dtype], 2 * relative_error(eager, truth))


@pytest.mark.mlir
@pytest.mark.parametrize("entry", [3, -4, 1 << 40])
def test_an_index_out_of_range_raises_as_eager_does(entry, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    module = gathered_matmul(4, 1, 8, 8, 3)
    x, w, index = inputs_for(module, 4, seed=0)
    index[2] = entry
    with pytest.raises(IndexError, match=f"index {entry} is out of bounds for dimension 0 with size 3"):
        _compiled(module)(x, w, index)
    with pytest.raises(ExecutionError, match=f"IndexError: index {entry} is out of bounds"):
        run_module(module, [x, w, index])


@pytest.mark.mlir
def test_a_batch_the_index_does_not_match_is_an_error_not_a_wild_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    module = gathered_matmul(None, 1, 8, 8, 3)
    plan = _compiled(module)
    x, w, index = inputs_for(module, 4, seed=0)
    with pytest.raises(KernelCallError, match="batch dims differ"):
        plan(x[:1], w, index)  # eager would broadcast x's batch of 1


@pytest.mark.mlir
def test_the_moe_layer_runs_its_experts_without_gathering_or_copying_weights_or_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path / "cache"))
    model, inputs = ZOO["moe"]()
    flagtree.clear_reports()
    with torch.no_grad():
        torch.compile(model, backend="flagtree", options={"dump_dir": str(tmp_path / "dump")})(*inputs)
    (output,) = (tmp_path / "dump").glob("graph_*_inference/output.ftir")
    module = parse_module(output.read_text(), str(output))
    names = [op.name for op in module.walk()]
    assert names.count("ft.gather_matmul") == 3 and "ft.index" not in names
    # w1, w3 and w2 in nn.Linear layout; the gate and up projections read each token for its k = 2 experts.
    layouts = [op.attributes for op in module.walk() if op.name == "ft.gather_matmul"]
    assert layouts == [{"transpose_w": True, "x_repeat": 2}] * 2 + [{"transpose_w": True}]
    plan = CpuBackend().compile(module, CpuBackend().capabilities()).source
    experts_part = plan[plan.index("check_index("):plan.index("fused_gather_matmul_2(")]
    assert not {"permute", "expand", "contiguous"} & set(re.findall(r"\w+", experts_part)), experts_part
    (report,) = flagtree.reports()
    assert report.backend == "cpu" and not report.kernel_fallbacks


@pytest.mark.mlir
@pytest.mark.parametrize("vector_bits", [128, 256])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_the_dot_product_kernel_fits_narrower_vectors(vector_bits, dtype, monkeypatch):
    """transpose_w's kernel takes its lane count from the host: its sums across lanes (a tree of
    log2(lanes) levels) and chunks of k hold for 4 and 8 f32 lanes as for 16."""
    monkeypatch.setattr(gather_matmul, "host_cpu", lambda: dataclasses.replace(host_cpu(), vector_bits=vector_bits))
    module = gathered_matmul(None, 3, 21, 13, 4, dtype, x_repeat=2)
    lowered = clone_module(module)
    FuseGatherMatmul().run(lowered)
    kernel = compile_op(gather_matmuls(lowered)[0])
    inputs = inputs_for(module, 14, seed=vector_bits, x_repeat=2)
    (got,) = kernel(*inputs)
    truth = fp64_truth(module, inputs)
    allowed = max(TOLERANCES[got.dtype], 2 * relative_error(run_module(module, inputs)[0], truth))
    assert relative_error(got, truth) <= allowed


def test_the_interpret_backend_runs_the_fused_op_through_its_reference():
    """Backends without a kernel for ft.gather_matmul (it is not in their pipeline) still run it."""
    module = gathered_matmul(6, 1, 5, 7, 3)
    plan = _compiled(module, InterpretBackend())
    inputs = inputs_for(module, 6, seed=1)
    (got,) = plan(*inputs)
    assert relative_error(got, fp64_truth(module, inputs)) <= 1e-5
    assert any("ft.gather_matmul" in op for op in plan.fallback_ops)
