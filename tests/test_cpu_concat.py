"""A concatenation inside a cpu fusion kernel (fuse-elementwise{concat=true}): each piece is
computed by a loop nest of its own into its slice of the result.  Rotary embeddings (rotate-half
and DeepSeek's interleaved stack) compiled vs fp64 eager, random concat groups compiled vs an fp64
run of the same FTIR, and the zoo transformer block's plan (one kernel per rotary)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flagtree
from examples.zoo import ZOO, Rotary
from flagtree.backends.cpu import CpuBackend
from flagtree.backends.reference import run_module
from flagtree.ir import Builder, Module, Value, new_function, parse_module, verify
from flagtree.ir.printer import print_module
from flagtree.ir.types import ScalarType, TensorType
from flagtree.passes import PassManager
from tests.frontend_helpers import DEFAULT_CPU_BACKEND, assert_matches_fp64, fp64_twin

pytest.importorskip("torch_mlir")
pytestmark = pytest.mark.mlir


def compiled_rotary(interleaved: bool, dim: int, dtype: torch.dtype, lengths: tuple[int, ...]) -> None:
    """Rotary on (3, T, 5, dim) inputs, compiled once (T dynamic when there are several
    lengths) and run at each length,
    against the fp64 twin; the whole rotary is one kernel, nothing runs in eager torch."""
    flagtree.clear_reports()
    model = Rotary(dim, max_seq=64, interleaved=interleaved).to(dtype)
    twin, _ = fp64_twin(model, ())
    compiled = torch.compile(model, backend="flagtree")
    with torch.no_grad():
        for seed, length in enumerate(lengths):
            x = torch.randn(3, length, 5, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
            if len(lengths) > 1:
                torch._dynamo.mark_dynamic(x, 1)
            got = compiled(x)
            assert got.dtype == dtype and got.shape == x.shape
            assert_matches_fp64(got, twin(x.double()), dtype, f"rotary at length {length}")
    (report,) = flagtree.reports()
    assert report.backend == DEFAULT_CPU_BACKEND and not report.kernel_fallbacks
    assert report.fusions == {"elementwise_group": 1}, "the rotary is one kernel"
    flagtree.clear_reports()


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_is_one_kernel_and_matches_fp64(interleaved, dtype):
    compiled_rotary(interleaved, 34, dtype, (17,))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_rotary_with_a_dynamic_sequence_length_matches_fp64(interleaved):
    compiled_rotary(interleaved, 18, torch.float32, (9, 23))


def test_the_transformer_blocks_rotaries_are_one_kernel_each(tmp_path):
    """No concat between kernels: each of q's and k's rotary is one fusion holding its concat
    and all of its arithmetic (4 multiplies, a subtract and an add)."""
    model, inputs = ZOO["transformer_block"]()
    with torch.no_grad():
        torch.compile(model, backend="flagtree", options={"dump_dir": str(tmp_path)})(*inputs)
    (output,) = tmp_path.glob("graph_*_inference/output.ftir")
    block = parse_module(output.read_text(), str(output)).function().regions[0].block
    assert "ft.concat" not in [op.name for op in block.ops]
    rotaries = [op for op in block.ops if op.name == "ft.fusion"
                and any(inner.name == "ft.concat" for inner in op.regions[0].block.ops)]
    assert len(rotaries) == 2
    for fusion in rotaries:
        names = [inner.name for inner in fusion.regions[0].block.ops]
        assert (names.count("ft.mul"), names.count("ft.sub"), names.count("ft.add")) == (4, 1, 1)


# ---------------------------------------------------------------------- random concat groups
ELEMENTWISE = ["ft.exp", "ft.sin", "ft.neg", "ft.tanh", "ft.sigmoid"]


@st.composite
def concat_programs(draw) -> tuple[Module, list[torch.Tensor], list[torch.Tensor]]:
    """@main joining 1-3 elementwise pieces of random sizes along a random dim of a rank-3
    shape (a piece other than the first may be an input itself; with `stack` every piece is
    a value unsqueezed into the joined dim), optionally scaled by an elementwise tail at the
    result's shape, the joined dim static or dynamic; results: the concatenation or the
    tail, and sometimes a piece too.  Returns the module, f32 or bf16 inputs, and the fp64
    module's results on the same values."""
    dtype = draw(st.sampled_from(["f32", "bf16"]))
    shape = [draw(st.sampled_from([1, 2, 3, 5])) for _ in range(3)]
    dim = draw(st.integers(0, 2))
    stack = draw(st.booleans())
    sizes = [1 if stack else draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 3)))]
    piece_shapes = [[*shape[:dim], size, *shape[dim + 1:]] for size in sizes]
    # with `stack`, pieces are computed without the joined dim and unsqueezed into it
    input_shapes = [[*s[:dim], *s[dim + 1:]] if stack else s for s in piece_shapes]
    result_shape = [*shape[:dim], sum(sizes), *shape[dim + 1:]]
    # the first piece is computed: a concat of inputs alone joins no kernel
    kinds = [draw(st.sampled_from(["unary", "binary"]))] + [draw(st.sampled_from(["input", "unary", "binary"]))
                                                          for _ in sizes[1:]]
    tail = draw(st.booleans())
    # a dynamic joined dim: the slices' offsets are computed at run time
    dynamic = not stack and draw(st.booleans())

    def typed(shape: list[int]) -> TensorType:
        return TensorType(tuple(None if dynamic and k == dim else d for k, d in enumerate(shape)), ScalarType(dtype))

    module = Module.empty()
    arg_types = [typed(s) for s in [*input_shapes, result_shape]]
    _, block = new_function(module, "main", arg_types)
    b = Builder(block)
    *piece_args, other = block.args
    pieces: list[Value] = []
    for arg, kind, piece_shape in zip(piece_args, kinds, piece_shapes):
        value = arg
        if kind != "input":
            value = b.value(draw(st.sampled_from(ELEMENTWISE)), value)
        if kind == "binary":
            value = b.value("ft.mul", value, arg)
        if stack:
            value = b.value("ft.reshape", value, result_type=TensorType(tuple(piece_shape), ScalarType(dtype)))
        pieces.append(value)
    joined = b.value("ft.concat", *pieces, dim=dim)
    results = [b.value("ft.add", b.value("ft.mul", joined, other), other) if tail else joined]
    if draw(st.booleans()):
        results.append(pieces[0])
    b.create("func.return", results, {}, [])
    verify(module)

    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    inputs = [torch.randn(s, generator=generator).to(t.dtype.torch_dtype)
              for s, t in zip([*input_shapes, result_shape], arg_types)]
    fp64 = parse_module(re.sub(rf"(?<=[<x\s(,]){dtype}(?![0-9A-Za-z])", "f64", print_module(module)))
    truth = run_module(fp64, [x.double() for x in inputs])
    return module, inputs, truth


@settings(max_examples=12)
@given(concat_programs())
def test_random_concat_groups_match_fp64(program):
    module, inputs, truth = program
    PassManager("fuse-elementwise{concat=true}").run(module)
    block = module.function().regions[0].block
    assert "ft.concat" not in [op.name for op in block.ops], "the concat joined its pieces' kernel"
    backend = CpuBackend()
    plan = backend.compile(module, backend.capabilities())
    assert not plan.fallback_ops, print_module(module)
    for index, (got, expected) in enumerate(zip(plan(*inputs), truth, strict=True)):
        assert_matches_fp64(got, expected, got.dtype, f"result #{index}")
