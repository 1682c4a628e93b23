"""fuse-gather-matmul (passes/fuse_gather_matmul.py) and the cpu kernel of ft.gather_matmul
(backends/cpu/gather_matmul.py): the rewrite keeps semantics on random shapes and indices (negative
ones too), leaves near misses alone, and the kernel matches fp64 without copying the weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flagtree
from examples.zoo import ZOO
from flagtree.backends.cpu import CpuBackend
from flagtree.backends.cpu.kernel import KernelCallError
from flagtree.backends.interpret import InterpretBackend
from flagtree.backends.reference import run_module
from flagtree.backends.reference.executor import ExecutionError
from flagtree.ir import Builder, Module, Value, new_function, verify
from flagtree.ir.parser import clone_module, parse_module
from flagtree.ir.printer import print_module
from flagtree.ir.types import ScalarType, TensorType
from flagtree.passes.fuse_gather_matmul import FuseGatherMatmul
from tests.frontend_helpers import TOLERANCE, relative_error

TOLERANCES = {**TOLERANCE, torch.float16: 2e-3}
SIZES = (1, 2, 3, 16, 17)


def gathered_matmul(batch: int | None, m: int, k: int, n: int, experts: int, dtype: str = "f32",
                    transposed: bool = True, index_dtype: str = "i64", returns_gather: bool = False) -> Module:
    """@main(x [B, M, K], w, index [B]) = x @ w[index] (w [E, N, K] read transposed, as an MoE's
    nn.Linear-layout experts are, or w [E, K, N] as it is), and w[index] too if `returns_gather`."""
    element = ScalarType(dtype)
    w_shape = (experts, n, k) if transposed else (experts, k, n)
    module = Module.empty()
    _, block = new_function(module, "main", [TensorType((batch, m, k), element), TensorType(w_shape, element),
                                             TensorType((batch,), ScalarType(index_dtype))])
    x, w, index = block.args
    b = Builder(block)
    gathered = b.value("ft.index", w, index, dims=(0,), result_type=TensorType((batch, *w_shape[1:]), element))
    right = b.value("ft.transpose", gathered, perm=(0, 2, 1)) if transposed else gathered
    b.create("func.return", [b.value("ft.matmul", x, right), *[gathered] * returns_gather])
    verify(module)
    return module


def inputs_for(module: Module, batch: int, seed: int) -> list[torch.Tensor]:
    """Random x and w, and an index of every entry kind: -E ... E - 1."""
    generator = torch.Generator().manual_seed(seed)
    x_type, w_type, index_type = (a.type for a in module.function().regions[0].block.args)
    experts = w_type.shape[0]
    x = torch.randn((batch, *x_type.shape[1:]), generator=generator).to(x_type.dtype.torch_dtype)
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
@settings(max_examples=25, deadline=None)
@given(batch=st.sampled_from(SIZES), m=st.sampled_from((1, 3)), k=st.sampled_from(SIZES), n=st.sampled_from(SIZES),
       experts=st.sampled_from((1, 3, 8)), dtype=st.sampled_from(("f32", "bf16")), transposed=st.booleans(),
       index_dtype=st.sampled_from(("i64", "i32")), seed=st.integers(0, 2**31 - 1))
def test_the_rewrite_keeps_semantics(batch, m, k, n, experts, dtype, transposed, index_dtype, seed):
    before = gathered_matmul(batch, m, k, n, experts, dtype, transposed, index_dtype)
    after = clone_module(before)
    assert FuseGatherMatmul().run(after)
    verify(after)
    expected_ops = ["ft.transpose"] * transposed + ["ft.gather_matmul", "func.return"]
    assert op_names(after) == expected_ops, "the gather (and its transpose) are gone"
    inputs = inputs_for(before, batch, seed)
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


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_are_left_alone(name):
    module = _near_miss(NEAR_MISSES[name])
    text = print_module(module)
    assert not FuseGatherMatmul().run(module)
    assert print_module(module) == text


# ---------------------------------------------------------------------- the cpu kernel
def _compiled(module: Module, backend=None):
    backend = backend or CpuBackend()
    lowered = clone_module(module)
    FuseGatherMatmul().run(lowered)
    return backend.compile(lowered, backend.capabilities())


@pytest.mark.mlir
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (33, 1, 17, 5, 3), (7, 3, 16, 33, 8), (64, 2, 32, 64, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_fp64_and_copies_no_weights(shape, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    batch, m, k, n, experts = shape
    module = gathered_matmul(None, m, k, n, experts, dtype)  # one kernel for every batch size
    plan = _compiled(module)
    assert "fused_gather_matmul(" in plan.source and "index_select" not in plan.source
    assert not plan.fallback_ops
    for seed, rows in enumerate((batch, 2 * batch + 1)):
        inputs = inputs_for(module, rows, seed)
        (got,) = plan(*inputs)
        (eager,) = run_module(module, inputs)
        truth = fp64_truth(module, inputs)
        assert got.dtype == eager.dtype and got.shape == eager.shape
        # Narrow floats: no worse than eager's own rounding (it also accumulates in f32, in another order).
        allowed = max(TOLERANCES[got.dtype], 2 * relative_error(eager, truth))
        assert relative_error(got, truth) <= allowed


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
def test_the_moe_layer_runs_its_experts_without_gathering_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path / "cache"))
    model, inputs = ZOO["moe"]()
    flagtree.clear_reports()
    with torch.no_grad():
        torch.compile(model, backend="flagtree", options={"dump_dir": str(tmp_path / "dump")})(*inputs)
    (output,) = (tmp_path / "dump").glob("graph_*_inference/output.ftir")
    names = [op.name for op in parse_module(output.read_text(), str(output)).walk()]
    assert names.count("ft.gather_matmul") == 3 and "ft.index" not in names
    (report,) = flagtree.reports()
    assert report.backend == "cpu" and not report.kernel_fallbacks


def test_the_interpret_backend_runs_the_fused_op_through_its_reference():
    """Backends without a kernel for ft.gather_matmul (it is not in their pipeline) still run it."""
    module = gathered_matmul(6, 1, 5, 7, 3)
    plan = _compiled(module, InterpretBackend())
    inputs = inputs_for(module, 6, seed=1)
    (got,) = plan(*inputs)
    assert relative_error(got, fp64_truth(module, inputs)) <= 1e-5
    assert any("ft.gather_matmul" in op for op in plan.fallback_ops)
