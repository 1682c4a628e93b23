"""Dynamic shapes: symbolic dims become `?` dims, sizes are rebuilt from the inputs at run
time, and a second sequence length runs the same compiled graph (flagtree adds no guards)."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._sympy.functions import CeilDiv, FloorDiv, Max, Min, ModularIndexing, PythonMod

import flagtree
from examples.zoo import ZOO
from flagtree.backends.reference import run_module
from flagtree.frontend.backend import flagtree_backend
from flagtree.frontend.importer import SYMBOLS_ATTR
from flagtree.frontend.symbolic import SymbolicSizes
from flagtree.ir import Builder, Module, new_function, parse_module, tensor, verify
from tests.frontend_helpers import assert_matches_fp64, fp64_twin
from tests.test_training import assert_gradients_match_fp64, training_step

SEQUENCE_LENGTHS = (8, 13)


def counting_flagtree(calls: list):
    """flagtree's backend, counting how often Dynamo hands it a graph."""

    def backend(gm, example_inputs, **kwargs):
        calls.append(gm)
        return flagtree_backend(gm, example_inputs, **kwargs)

    return backend


def with_length(x: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    """A fresh input shaped like `x` but with sequence length `length` (dim 1)."""
    shape = list(x.shape)
    shape[1] = length
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)


@pytest.mark.parametrize("name", ["transformer_block", "moe", "deepseek_block"])
def test_a_second_sequence_length_runs_the_same_compiled_graph(name):
    flagtree.clear_reports()
    model, (x,) = ZOO[name]()
    twin, _ = fp64_twin(model, (x,))
    calls: list = []
    compiled = torch.compile(model, backend=counting_flagtree(calls), dynamic=True)
    with torch.no_grad():
        for seed, length in enumerate(SEQUENCE_LENGTHS):
            xi = with_length(x, length, seed)
            assert_matches_fp64(compiled(xi), twin(xi.double()), torch.float32, f"{name} at length {length}")
    assert len(calls) == 1, "the second length recompiled"
    assert len(flagtree.reports()) == 1


def test_symbolic_dims_are_dynamic_and_each_symbol_names_its_source(tmp_path):
    model, (x,) = ZOO["transformer_block"]()
    with torch.no_grad():
        torch.compile(model, backend="flagtree", dynamic=True, options={"dump_dir": str(tmp_path)})(x)
    (dumped,) = tmp_path.glob("graph_*_inference/input.ftir")
    function = parse_module(dumped.read_text(), str(dumped)).function()
    args = function.regions[0].block.args
    dynamic_dims = {(i, d) for i, a in enumerate(args) for d, size in enumerate(getattr(a.type, "shape", ())) if
                    size is None}
    assert dynamic_dims, "dynamic=True gives `?` dims"
    symbols = function.attributes[SYMBOLS_ATTR]
    assert symbols, "the function records where its symbols come from"
    for name, source in symbols.items():
        assert len(source) == 2 and tuple(source) in dynamic_dims, f"symbol {name} points at {source}"
    assert {tuple(s) for s in symbols.values()} == dynamic_dims, "every `?` input dim is some symbol's source"


def test_dynamic_training_compiles_once_and_matches_fp64():
    flagtree.clear_reports()
    model, (x,) = ZOO["transformer_block"]()
    model.train()
    calls: list = []
    compiled = torch.compile(model, backend=counting_flagtree(calls), dynamic=True)
    for seed, length in enumerate(SEQUENCE_LENGTHS):
        xi = with_length(x, length, seed)
        twin, (twin_x,) = fp64_twin(model, (xi,))
        reference_out, reference_grads = training_step(twin, twin, (twin_x,))
        model.zero_grad()
        out, grads = training_step(model, compiled, (xi,))
        assert_matches_fp64(out, reference_out, torch.float32, f"output at length {length}")
        assert_gradients_match_fp64(grads, reference_grads, torch.float32, f"length {length}")
    assert len(calls) == 1
    reports = {r.graph.rsplit("_", 1)[1]: r for r in flagtree.reports()}
    assert sorted(reports) == ["backward", "forward"]
    # the explicit causal attention trains fused at symbolic lengths too
    assert reports["forward"].fusions["attention"] == 1 and reports["backward"].fusions["attention_grad"] == 1


# --------------------------------------------------------------------------- size materializer

S0, S1 = sympy.symbols("s0 s1", integer=True, positive=True)
_leaves = st.one_of(st.sampled_from([S0, S1]), st.integers(-3, 6).map(sympy.Integer))
_positive = st.one_of(st.sampled_from([S0, S1]), st.integers(1, 5).map(sympy.Integer))


def _combine(children):
    pair = st.tuples(children, children)
    with_divisor = st.tuples(children, _positive)
    return st.one_of(
        pair.map(lambda ab: ab[0] + ab[1]),
        pair.map(lambda ab: ab[0] * ab[1]),
        pair.map(lambda ab: Max(*ab)),
        pair.map(lambda ab: Min(*ab)),
        with_divisor.map(lambda ab: FloorDiv(*ab)),
        with_divisor.map(lambda ab: PythonMod(*ab)),
        with_divisor.map(lambda ab: CeilDiv(*ab)),
        st.tuples(children, _positive, _positive).map(lambda abc: ModularIndexing(*abc)),
    )


@given(expr=st.recursive(_leaves, _combine, max_leaves=8), s0=st.integers(2, 40), s1=st.integers(2, 40))
def test_materialized_sizes_compute_their_expression(expr, s0, s1):
    """Any size expression over input dims becomes i64 FTIR that computes it at run time."""
    module = Module.empty()
    _, block = new_function(module, "main", [tensor((None, None), "f32")])
    builder = Builder(block)
    sizes = SymbolicSizes(lambda name, operands, attrs, result_type: builder.create(
        name, operands, attrs, None if result_type is None else [result_type]).result)
    sizes.bind_dim(S0, block.args[0], 0)
    sizes.bind_dim(S1, block.args[0], 1)
    value = sizes.materialize(expr)
    builder.create("func.return", [value], result_types=[])
    verify(module)
    (actual,) = run_module(module, [torch.empty(s0, s1)])
    assert actual == int(expr.subs({S0: s0, S1: s1}))
