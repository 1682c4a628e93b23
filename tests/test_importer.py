"""The FX → FTIR importer: every zoo graph imports, verifies and computes what the aten graph
computes; type promotion, fallbacks, locations and the generated mapping table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

from examples.zoo import ZOO
from flagtree.backends.reference import run_module
from flagtree.frontend import aten_mapping
from flagtree.frontend.backend import decomposition_table
from flagtree.frontend.importer import ConstantOutput, ImportedGraph, import_graph, mapping_markdown
from flagtree.ir import parse_module, print_module, verify
from flagtree.ir.opdef import lookup
from tests.frontend_helpers import relative_error

ROOT = Path(__file__).resolve().parent.parent


def run_imported(imported: ImportedGraph, args: list[Any]) -> list[Any]:
    """Call the imported module the way the FX graph is called."""
    results = run_module(imported.module, [args[i] for i in imported.arg_indices])
    return [results[slot] if isinstance(slot, int) else slot.value for slot in imported.outputs]


def assert_same_outputs(actual: list[Any], expected: list[Any], where: str) -> None:
    assert len(actual) == len(expected), where
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not isinstance(e, torch.Tensor):
            assert a == e, f"{where}: output {i} is {a!r}, the graph gives {e!r}"
            continue
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{where}: output {i} is {a.dtype}{list(a.shape)}"
        if e.is_floating_point():
            assert relative_error(a, e) <= 1e-5, f"{where}: output {i} differs: {relative_error(a, e):.3g}"
        else:
            assert torch.equal(a, e), f"{where}: output {i} differs"


def differential_backend(imported_graphs: list[tuple[str, ImportedGraph]]):
    """An aot_autograd backend that imports each aten graph (no passes) and, at run time,
    checks the FTIR computes what the aten graph computes on the real inputs."""

    def compiler(kind: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]):
            with unset_fake_temporarily():
                imported = import_graph(gm)
                verify(imported.module)
            imported_graphs.append((kind, imported))

            def run(args: list[Any]) -> Any:
                expected = gm(*args)
                assert_same_outputs(run_imported(imported, args), list(expected), f"{kind} graph")
                return expected

            run._boxed_call = True
            return run

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"), decompositions=decomposition_table())


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_graphs_import_verify_and_match_the_aten_graph(name, training):
    model, inputs = ZOO[name]()
    imported: list[tuple[str, ImportedGraph]] = []
    compiled = torch.compile(model, backend=differential_backend(imported))
    if training:
        model.train()
        compiled(*inputs).sum().backward()
        assert [kind for kind, _ in imported] == ["forward", "backward"]
    else:
        with torch.no_grad():
            compiled(*inputs)
        assert [kind for kind, _ in imported] == ["inference"]
    for kind, graph in imported:
        undocumented = set(graph.fallbacks) - set(aten_mapping.DOCUMENTED_FALLBACKS)
        assert not undocumented, f"{name} {kind}: ops fell back with no documented reason: {sorted(undocumented)}"


def import_function(fn, *args: torch.Tensor) -> ImportedGraph:
    """Trace `fn` to an aten graph (fake tensors, flagtree's decompositions) and import it."""
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*args)
    imported = import_graph(gm)
    verify(imported.module)
    return imported


_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]
_BINARY = [torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.eq, torch.lt, torch.ge,
           torch.remainder, torch.logical_and]
_DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(1, 9, shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("device", _DEVICES)
@given(
    op=st.sampled_from(_BINARY),
    lhs_dtype=st.sampled_from(_DTYPES),
    rhs=st.one_of(st.sampled_from(_DTYPES), st.sampled_from([2, -3, 0.5, True, 0.1, 257])),
    rhs_shape=st.sampled_from([(3,), (2, 3), ()]),
    seed=st.integers(0, 2**16),
)
# bf16 tensor times/over a 0-d f32 tensor: eager's CPU kernel reads the scalar in f32 and rounds the
# product once; casting it to bf16 first was 1 bf16 ulp off (issue 3).
@example(op=torch.mul, lhs_dtype=torch.bfloat16, rhs=torch.float32, rhs_shape=(), seed=0)
@example(op=torch.div, lhs_dtype=torch.bfloat16, rhs=torch.float32, rhs_shape=(), seed=0)
def test_binary_ops_with_type_promotion_match_eager(device, op, lhs_dtype, rhs, rhs_shape, seed):
    """Mixed dtypes and Python scalars: the explicit casts and 0-d constants the importer
    inserts give exactly eager's dtype and values, on the device's eager kernels."""
    x = _tensor(lhs_dtype, (2, 3), seed).to(device)
    if isinstance(rhs, torch.dtype):
        y = _tensor(rhs, rhs_shape, seed + 1).to(device)
        fn, args = (lambda a, b: op(a, b)), (x, y)
    else:
        fn, args = (lambda a: op(a, rhs)), (x,)
    try:
        expected = fn(*args)
    except (RuntimeError, TypeError):
        return  # eager rejects this combination (sub on bools, maximum with a scalar); nothing to compare
    imported = import_function(fn, *args)
    (actual,) = run_imported(imported, list(args))
    assert actual.dtype == expected.dtype
    if expected.is_floating_point():
        torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


def test_the_regression_example_differs_from_rounding_the_scalar_first():
    """The @example above fails the old import: eager's bf16 × 0-d f32 product is not the product
    with the scalar rounded to bf16."""
    x, y = _tensor(torch.bfloat16, (2, 3), 0), _tensor(torch.float32, (), 1)
    assert not torch.equal(x * y, x * y.to(torch.bfloat16))
    assert torch.equal(x * y, (x.float() * y).to(torch.bfloat16))


@pytest.mark.parametrize("device,op,in_opmath", [
    ("cpu", torch.mul, True), ("cpu", torch.div, True), ("cpu", torch.add, False), ("cpu", torch.remainder, False),
    ("cuda", torch.add, True), ("cuda", torch.mul, True), ("cuda", torch.remainder, False),
])
def test_a_scalar_enters_a_bf16_op_in_f32_where_the_devices_eager_kernel_reads_it_so(device, op, in_opmath):
    """x_bf16 op 0.1 computes in f32 and rounds once where eager's kernel on that device reads
    the scalar in f32 (flagtree.frontend.aten_mapping._SCALAR_IN_OPMATH), else in bf16 with the
    scalar rounded first. CUDA is traced with fake tensors: the structure, not the values."""
    with FakeTensorMode():
        x = torch.empty(2, 3, dtype=torch.bfloat16, device=device)
    imported = import_function(lambda a: op(a, 0.1), x)
    (arithmetic,) = [o for o in imported.module.walk() if o.name in ("ft.mul", "ft.div", "ft.add", "ft.remainder")]
    constant = next(o for o in imported.module.walk() if o.name == "ft.constant")
    expected = "f32" if in_opmath else "bf16"
    assert str(arithmetic.result.type.dtype) == str(constant.result.type.dtype) == expected
    (result,) = imported.module.function().regions[0].block.ops[-1].operands
    assert str(result.type) == "tensor<2x3xbf16>"


def test_python_scalars_become_0d_constants_and_promotion_is_explicit():
    imported = import_function(lambda x: x + 0.5, torch.arange(4))
    ops = [op for op in imported.module.walk() if op.name.startswith("ft.")]
    assert [op.name for op in ops] == ["ft.cast", "ft.constant", "ft.add"]
    cast, constant, _ = ops
    assert str(cast.result.type) == "tensor<4xf32>"
    assert str(constant.result.type) == "tensor<f32>" and float(constant.attributes["value"].value) == 0.5


def test_unmapped_op_becomes_a_counted_torch_call_that_runs():
    x = torch.randn(3, 4)
    imported = import_function(lambda a: torch.cosh(a) * 2, x)
    assert imported.fallbacks == {"aten.cosh.default": 1}
    (call,) = [op for op in imported.module.walk() if op.name == "ft.torch_call"]
    assert call.attributes["target"] == "aten::cosh.default"
    assert call.attributes["args"] == [{"operand": 0}]
    (actual,) = run_imported(imported, [x])
    torch.testing.assert_close(actual, torch.cosh(x) * 2)


def test_torch_call_drops_outputs_the_op_did_not_compute():
    """convolution_backward returns None for gradients it was not asked for; the
    fallback's results are its computed outputs only, and getitem picks the right ones."""
    x, w, grad = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 3, 3)

    def weight_and_bias_grads(g, inp, weight):
        outs = torch.ops.aten.convolution_backward(g, inp, weight, [3], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                   [False, True, True])
        return outs[1], outs[2]

    imported = import_function(weight_and_bias_grads, grad, x, w)
    (call,) = [op for op in imported.module.walk() if op.name == "ft.torch_call"]
    assert len(call.results) == 2
    actual = run_imported(imported, [grad, x, w])
    for a, e in zip(actual, weight_and_bias_grads(grad, x, w)):
        torch.testing.assert_close(a, e)


def test_non_tensor_outputs_are_constants_of_the_call():
    imported = import_function(lambda x: (x * 2, None, x.shape[0]), torch.randn(5))
    assert imported.outputs[1:] == [ConstantOutput(None), ConstantOutput(5)]
    assert run_imported(imported, [torch.ones(5)])[1:] == [None, 5]


def test_multi_output_ops_and_getitem():
    x = torch.randn(4, 7)

    def fn(a):
        values, indices = torch.max(a, dim=1)
        top, where = torch.topk(a, 3)
        first, rest = torch.split(a, [2, 5], dim=1)
        return values, indices, top, where, first, rest

    imported = import_function(fn, x)
    assert not imported.fallbacks
    assert_same_outputs(run_imported(imported, [x]), list(fn(x)), "multi-output")


def test_ops_get_the_source_line_and_fx_node_as_location(tmp_path):
    class Model(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x) + 1  # the line the location must name

    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
                if "the line the location must name" in text and "torch.sin" in text)
    imported: list[tuple[str, ImportedGraph]] = []
    with torch.no_grad():
        torch.compile(Model(), backend=differential_backend(imported))(torch.randn(3))
    (sin,) = [op for op in imported[0][1].module.walk() if op.name == "ft.sin"]
    assert (Path(sin.location.file).name, sin.location.line, sin.location.name) == ("test_importer.py", line, "sin")


def test_imported_text_round_trips_through_the_parser():
    model, inputs = ZOO["deepseek_block"]()
    imported: list[tuple[str, ImportedGraph]] = []
    with torch.no_grad():
        torch.compile(model, backend=differential_backend(imported))(*inputs)
    text = print_module(imported[0][1].module, print_locations=True)
    assert print_module(parse_module(text), print_locations=True) == text


def test_every_ftir_op_the_table_names_exists():
    for aten, lowering in aten_mapping.LOWERINGS.items():
        for name in re.findall(r"`(ft\.[a-z_]+)`", lowering.ftir):
            assert lookup(name) is not None, f"{aten} maps to unknown FTIR op {name}"


def test_docs_importer_md_is_generated_from_the_mapping_table():
    assert (ROOT / "docs" / "importer.md").read_text() == mapping_markdown(), (
        "docs/importer.md is stale: regenerate it with `python -m flagtree.frontend.importer --markdown "
        "> docs/importer.md`"
    )


def test_markdown_command_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "flagtree.frontend.importer", "--markdown"], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    assert proc.stdout == mapping_markdown()


def test_in_place_updates_are_functionalized_and_imported():
    """A KV-cache style slice write and an index write reach the importer as
    slice_scatter / index_put and import without fallbacks."""

    class Model(torch.nn.Module):
        def forward(self, cache, new, rows):
            cache = cache.clone()
            cache[:, 2:6:2] = new * 2
            cache[rows] += 1.0
            return torch.nn.functional.leaky_relu(cache, 0.1) + torch.nn.functional.hardtanh(cache)

    imported: list[tuple[str, ImportedGraph]] = []
    args = (torch.randn(3, 8), torch.randn(3, 2), torch.tensor([0, 2]))
    with torch.no_grad():
        torch.compile(Model(), backend=differential_backend(imported))(*args)
    ((_, graph),) = imported
    assert not graph.fallbacks
    names = {op.name for op in graph.module.walk()}
    assert {"ft.index_put", "ft.iota"} <= names
