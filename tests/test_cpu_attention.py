"""The cpu backend's ft.attention kernel (backends/cpu/attention.py) against an fp64 evaluation
of the op's reference (flagtree/ir/ops/attention.py), on fresh random inputs.

Hypothesis draws the kernel's specialisation (dtype, causal kind, window, mask kind and
layout, sinks, static or `?` shapes) and the run-time problem (batch, GQA/MQA head counts,
lengths such as 2^k+17 and 1, unequal qk/v head dims, fully masked rows, large logits, and
each input's memory layout: contiguous, a permuted or sliced view the kernel reads in place,
or a view with a non-unit innermost stride, which the wrapper copies).  A
kernel passes when its relative L2 error against fp64 is within DESIGN.md's tolerance for the
dtype, or within twice eager torch's own error on the same inputs, or within eight f32 ulps of
the largest logit (large logits are ill-conditioned in any f32 evaluation), has no NaN, and
gives exactly 0 in rows that see no key; with `with_lse`, its log-sum-exp is checked too.
Kernels are compiled once per specialisation and shared between examples.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch_mlir")

from flagtree.backends.cpu import CpuBackend, attention, compiler, jit
from flagtree.backends.cpu import kernel as kernel_module
from flagtree.backends.cpu.kernel import CpuKernel, KernelCallError
from flagtree.ir import Builder, Module, Operation, new_function, verify
from flagtree.ir.ops.attention import CAUSAL_KINDS, attention_reference, visible_keys
from flagtree.ir.parser import parse_module
from flagtree.ir.printer import print_module
from flagtree.ir.types import ScalarType, parse_type

pytestmark = pytest.mark.mlir

TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LENGTHS = (1, 5, 17, 33, 81)  # 81 = 2^6 + 17
HEADS = ((1, 1), (2, 2), (4, 2), (8, 2), (4, 1))  # (query heads, KV heads): groups 1, 2, 4 and MQA
HEAD_DIMS = ((16, 16), (8, 24), (5, 3), (64, 64))  # (qk, v)
MASK_LAYOUTS = ((1, 1, None, None), (None, 1, 1, None), (None, None, None, None))  # None: full size (or 1 if `?`)
# How an input lies in memory: contiguous; [B, S, H, D] storage viewed as [B, H, S, D] (what the
# plan passes after a projection); every other row of a wider buffer; innermost stride ≠ 1 (copied).
MEMORY_LAYOUTS = ("contiguous", "permuted", "sliced", "innermost_strided")
SCALE = 0.3


# ---------------------------------------------------------------------- building kernels
def attention_module(types: tuple[str, ...], attributes: tuple[tuple[str, object], ...]) -> Module:
    """@main(q, k, v, [mask], [sinks]) returning one ft.attention's results."""
    module = Module.empty()
    _, block = new_function(module, "main", [parse_type(t) for t in types])
    attention = Builder(block).create("ft.attention", list(block.args), dict(attributes))
    block.append(Operation("func.return", list(attention.results)))
    verify(module)
    return module


def attention_op(module: Module) -> Operation:
    return next(op for op in module.function().regions[0].block.ops if op.name == "ft.attention")


@functools.cache
def compiled(types: tuple[str, ...], attributes: tuple[tuple[str, object], ...]) -> CpuKernel:
    return compiler.compile_op(attention_op(attention_module(types, attributes)))


def type_text(shape: tuple[int | None, ...], dtype: str) -> str:
    return "tensor<" + "".join(("?" if d is None else str(d)) + "x" for d in shape) + dtype + ">"


# ---------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One case: the kernel's specialisation and its run-time problem."""

    dtype: str = "f32"
    causal: str = "none"
    window: int = 0
    mask_kind: str = "none"  # none | i1 | float
    mask_layout: tuple[int | None, ...] = MASK_LAYOUTS[0]  # the mask's type: 1 or `?` (None) per dim
    mask_sizes: tuple[int | None, ...] = MASK_LAYOUTS[0]  # at run time: 1, or None = the full size
    sinks: bool = False
    static: bool = False
    batch: int = 1
    heads: tuple[int, int] = (2, 2)
    queries: int = 17
    keys: int = 17
    head_dims: tuple[int, int] = (16, 16)
    logit_scale: float = 1.0
    with_lse: bool = False  # also return each row's log-sum-exp (training)
    memory: tuple[str, ...] = ("contiguous",) * 5  # each input's MEMORY_LAYOUTS entry (q, k, v, then mask/sinks)
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return ScalarType(self.dtype).torch_dtype

    def shapes(self) -> list[tuple[int, ...]]:
        (hq, hkv), (dqk, dv) = self.heads, self.head_dims
        shapes = [(self.batch, hq, self.queries, dqk), (self.batch, hkv, self.keys, dqk),
                  (self.batch, hkv, self.keys, dv)]
        full = (self.batch, hq, self.queries, self.keys)
        if self.mask_kind != "none":
            shapes.append(tuple(1 if size == 1 else n for size, n in zip(self.mask_sizes, full)))
        if self.sinks:
            shapes.append((hq,))
        return shapes

    def kernel(self) -> CpuKernel:
        shapes = self.shapes()
        dtypes = [self.dtype] * 3
        if self.mask_kind != "none":
            dtypes.append("i1" if self.mask_kind == "i1" else self.dtype)
        if self.sinks:
            dtypes.append("f32")
        types = []
        for index, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            if not self.static:
                layout = self.mask_layout if self.mask_kind != "none" and index == 3 else (None,) * len(shape)
                shape = tuple(1 if d == 1 else None for d in layout)
            types.append(type_text(shape, dtype))
        return compiled(tuple(types), tuple(self.attributes().items()))

    def attributes(self) -> dict[str, object]:
        return {"scale": SCALE, "causal": self.causal, "window": self.window,
                "has_mask": self.mask_kind != "none", "has_sinks": self.sinks, "with_lse": self.with_lse}

    def inputs(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        shapes = self.shapes()
        q, k, v = (torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes[:3])
        inputs = [(q * self.logit_scale).to(self.torch_dtype), (k * self.logit_scale).to(self.torch_dtype),
                  v.to(self.torch_dtype)]
        if self.mask_kind != "none":
            inputs.append(self._mask(shapes[3], generator))
        if self.sinks:
            sinks = torch.randn(shapes[-1], generator=generator) * 2
            sinks[torch.rand(shapes[-1], generator=generator) < 0.3] = -math.inf  # a sink that adds nothing
            inputs.append(sinks)
        return [lay_out(x, memory) for x, memory in zip(inputs, self.memory)]

    def _mask(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Random keep/drop with whole rows hidden now and then (rows that see no key)."""
        keep = torch.rand(shape, generator=generator) < 0.7
        keep &= torch.rand((*shape[:-1], 1), generator=generator) > 0.2
        if self.mask_kind == "i1":
            return keep
        bias = torch.randn(shape, generator=generator, dtype=torch.float64)
        return bias.masked_fill(~keep, -math.inf).to(self.torch_dtype)

    def sees_nothing(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """[B, Hq, Sq]: rows with no visible key and no sink, which must be exactly 0."""
        (hq, _), sq, skv = self.heads, self.queries, self.keys
        visible = visible_keys(sq, skv, self.causal, self.window).expand(self.batch, hq, sq, skv)
        if self.mask_kind != "none":
            mask = inputs[3]
            visible = visible & (mask if mask.dtype == torch.bool else mask > -math.inf)
        nothing = ~visible.any(-1)
        if self.sinks:
            nothing &= (inputs[-1] == -math.inf).view(1, hq, 1)
        return nothing


def lay_out(x: torch.Tensor, memory: str) -> torch.Tensor:
    """x's values in the memory layout `memory` (MEMORY_LAYOUTS)."""
    if memory == "permuted" and x.dim() == 4:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if memory == "sliced":  # every other row of a wider buffer of NaN (a read outside the view shows)
        fill = math.nan if x.is_floating_point() else True
        if x.dim() == 1:
            return torch.full((2 * x.shape[0],), fill, dtype=x.dtype)[::2].copy_(x)
        wider = torch.full((*x.shape[:-2], 2 * x.shape[-2], x.shape[-1] + 3), fill, dtype=x.dtype)
        return wider[..., ::2, 3:].copy_(x)
    if memory == "innermost_strided":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 1 else x.repeat_interleave(2)[::2]
    return x


def fp64(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x if x.dtype == torch.bool else x.double() for x in inputs]


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def check(problem: Problem) -> None:
    kernel = problem.kernel()
    inputs = problem.inputs()
    attributes = problem.attributes()
    got, *lse = kernel(*inputs)
    truth, *truth_lse = attention_reference(fp64(inputs), {**attributes, "with_lse": True}, [])
    eager, *eager_lse = attention_reference(inputs, {**attributes, "with_lse": True}, [])
    if problem.with_lse:
        check_lse(lse[0], truth_lse[0], eager_lse[0])
    assert got.dtype == problem.torch_dtype and got.shape == truth.shape
    assert not torch.isnan(got).any(), f"NaN at {torch.isnan(got).nonzero()[:4].tolist()}"
    nothing = problem.sees_nothing(inputs)
    assert torch.equal(got[nothing], torch.zeros_like(got[nothing])), "a row that sees no key is not 0"
    error = relative_error(got, truth)
    allowed = max(TOLERANCE[problem.torch_dtype], 2 * relative_error(eager, truth), logit_rounding(inputs))
    assert error <= allowed, f"relative L2 error {error:.3g} > {allowed:.3g}"


def logit_rounding(inputs: list[torch.Tensor]) -> float:
    """What rounding the largest logit L to f32 can do to the weights: exp moves by L·eps relative
    (the kernel scales q before the dot product, eager after it: their logits differ by ulps);
    eight such ulps are allowed."""
    q, k = inputs[0].double(), inputs[1].double()
    group = q.shape[1] // max(k.shape[1], 1)
    logits = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)).abs() * SCALE
    return 8 * torch.finfo(torch.float32).eps * (logits.max().item() if logits.numel() else 0.0)


def check_lse(got: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor) -> None:
    """+inf exactly where fp64's is (rows that see nothing and have no sink), elsewhere within
    f32 rounding of it, or twice eager's error (large logits)."""
    assert got.dtype == eager.dtype and torch.equal(got == math.inf, truth == math.inf) and not got.isnan().any()
    finite = truth.isfinite()
    if finite.any():
        error = (got.double() - truth)[finite].abs().max().item()
        allowed = max(1e-5 * (1 + truth[finite].abs().max().item()),
                      2 * (eager.double() - truth)[finite].abs().max().item())
        assert error <= allowed, f"lse error {error:.3g} > {allowed:.3g}"


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    causal = draw(st.sampled_from(CAUSAL_KINDS))
    layout = draw(st.sampled_from(MASK_LAYOUTS))
    return Problem(
        dtype=draw(st.sampled_from(["f32", "bf16", "f16", "f64"])),
        causal=causal,
        window=draw(st.sampled_from([0, 1, 4, 16])) if causal != "none" else 0,
        mask_kind=draw(st.sampled_from(["none", "i1", "float"])),
        mask_layout=layout,
        mask_sizes=tuple(1 if d == 1 or draw(st.booleans()) else None for d in layout),
        sinks=draw(st.booleans()),
        static=draw(st.booleans()),
        batch=draw(st.sampled_from([1, 2])),
        heads=draw(st.sampled_from(HEADS)),
        queries=draw(st.sampled_from(LENGTHS)),
        keys=draw(st.sampled_from(LENGTHS)),
        head_dims=draw(st.sampled_from(HEAD_DIMS)),
        logit_scale=draw(st.sampled_from([1.0, 1.0, 30.0])),
        with_lse=draw(st.booleans()),
        memory=tuple(draw(st.sampled_from(MEMORY_LAYOUTS)) for _ in range(5)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------- tests
@settings(max_examples=60)
@given(problem=problems())
@example(problem=Problem(heads=(8, 2), queries=17, keys=5, causal="lower_right"))  # blocks span heads; Sq > Skv
@example(problem=Problem(heads=(4, 1), queries=1, keys=145, causal="lower_right", window=16, sinks=True))  # decode
@example(problem=Problem(dtype="bf16", mask_kind="float", mask_layout=(None,) * 4, mask_sizes=(1, None, 1, None),
                         queries=33, keys=81, logit_scale=30.0))
def test_attention_kernel_matches_fp64_reference(problem: Problem):
    check(problem)


def test_shapes_that_do_not_form_an_attention_raise_instead_of_reading_out_of_bounds():
    kernel = Problem(sinks=True).kernel()  # every dim `?`
    q, k, v, sinks = Problem(sinks=True).inputs()
    calls = [
        (q.expand(2, -1, -1, -1), k, v, sinks),  # two batches of q, one of k and v (eager torch broadcasts)
        (q[:, :1].expand(1, 3, -1, -1), k, v, sinks[:1].expand(3)),  # 3 query heads, 2 KV heads
        (q, k, v[:, :, :5], sinks),  # fewer values than keys
        (q, k, v, sinks[:1]),  # one sink for two heads (eager torch broadcasts)
    ]
    for args in calls:
        with pytest.raises(KernelCallError, match="cannot run on inputs of shapes"):
            kernel(*args)


def test_empty_query_and_key_dims():
    problem = Problem(sinks=True)
    kernel = problem.kernel()
    q, k, v, sinks = problem.inputs()
    (no_queries,) = kernel(q[:, :, :0], k, v, sinks)
    assert no_queries.shape == (1, 2, 0, 16)
    (no_keys,) = kernel(q, k[:, :, :0], v[:, :, :0], sinks)  # only the sink: weights 0 on every key
    assert torch.equal(no_keys, torch.zeros_like(no_keys))


def test_a_problem_split_across_cores_matches_the_reference(monkeypatch: pytest.MonkeyPatch):
    # 4 heads × 3 blocks of rows, and enough flops (at a lowered threshold) that each core computes a range.
    monkeypatch.setattr(attention, "PARALLEL_MIN_FLOPS", 1 << 12)
    check(Problem(heads=(4, 4), queries=145, keys=145, head_dims=(64, 64), causal="lower_right", window=100,
                  memory=("permuted", "sliced", "permuted", "contiguous", "contiguous")))


def test_work_is_split_across_cores_by_flops_not_by_elements():
    """Many short sequences hold many elements but few flops; a few long ones the opposite."""
    op = attention_op(attention_module(("tensor<?x?x?x?xf32>",) * 3, tuple(Problem().attributes().items())))
    enough = attention.worth_splitting(op)
    for (batch, length, dim), split in (((256, 4, 64), False), ((1, 1024, 16), True)):
        args = [torch.empty(batch, 4, length, dim, device="meta") for _ in range(3)]
        flops = 2 * batch * 4 * length * length * (dim + dim)
        assert (flops >= attention.PARALLEL_MIN_FLOPS) == split
        assert (4 * args[0].numel() >= kernel_module.PARALLEL_MIN_ELEMENTS) != split
        assert enough(args, []) == split


@given(queries=st.integers(0, 70), keys=st.integers(0, 70), causal=st.sampled_from(CAUSAL_KINDS),
       window=st.sampled_from([0, 1, 4, 16]))
def test_visible_pairs_counts_the_visible_keys(queries: int, keys: int, causal: str, window: int):
    window = window if causal != "none" else 0
    assert attention.visible_pairs(queries, keys, causal, window) == visible_keys(queries, keys, causal, window).sum()


def test_layouts_of_the_same_values_give_the_same_bits():
    """The kernel reads views in place (or copies those with a non-unit innermost stride): every
    layout of the same values computes the same output, bit for bit, in calls that alternate."""
    problem = Problem(dtype="bf16", heads=(4, 2), queries=33, keys=33, causal="lower_right", mask_kind="float",
                      mask_layout=(None,) * 4, mask_sizes=(None,) * 4, sinks=True)
    kernel = problem.kernel()
    (expected,) = kernel(*problem.inputs())
    for memory in (*MEMORY_LAYOUTS, "contiguous", "permuted"):
        (got,) = kernel(*Problem(**{**problem.__dict__, "memory": (memory,) * 5}).inputs())
        assert torch.equal(got, expected), memory


def test_the_output_is_laid_out_so_the_usual_permute_and_reshape_are_views():
    problem = Problem(batch=2, heads=(4, 2), queries=17, keys=33, head_dims=(8, 24), with_lse=True)
    kernel = problem.kernel()
    out, lse = kernel(*problem.inputs())
    batch, heads, queries, dim = out.shape
    merged = out.transpose(1, 2).reshape(batch, queries, heads * dim)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, not a copy
    assert lse.is_contiguous()


def test_launch_takes_outputs_laid_out_as_the_kernel_writes_them():
    problem = Problem(heads=(4, 2), queries=17, keys=17)
    kernel = problem.kernel()
    inputs = problem.inputs()
    (expected,) = kernel(*inputs)
    (shape,) = kernel.output_shapes(inputs)
    out = torch.empty(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)
    kernel.launch(inputs, [out])
    assert torch.equal(out, expected)
    with pytest.raises(KernelCallError, match=r"output #0 must be a torch\.float32 tensor of shape"):
        kernel.launch(inputs, [torch.empty(shape)])


# ---------------------------------------------------------------------- the backend
ATTENTION_MODULE = """
"builtin.module"() ({
  "func.func"() <{function_type = (tensor<1x4x?x32xbf16>, tensor<1x2x?x32xbf16>, tensor<1x2x?x32xbf16>,
                                   tensor<4xf32>) -> tensor<1x4x?x32xbf16>, sym_name = "main"}> ({
  ^bb0(%q: tensor<1x4x?x32xbf16>, %k: tensor<1x2x?x32xbf16>, %v: tensor<1x2x?x32xbf16>, %sinks: tensor<4xf32>):
    %0 = "ft.attention"(%q, %k, %v, %sinks) {scale = 0.17677669529663687 : f64, causal = "lower_right",
         window = 0 : i64, has_mask = false, has_sinks = true}
         : (tensor<1x4x?x32xbf16>, tensor<1x2x?x32xbf16>, tensor<1x2x?x32xbf16>, tensor<4xf32>)
         -> tensor<1x4x?x32xbf16>
    "func.return"(%0) : (tensor<1x4x?x32xbf16>) -> ()
  }) : () -> ()
}) : () -> ()
"""


def test_the_backend_compiles_attention_to_a_kernel_without_fallbacks(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))
    module = parse_module(ATTENTION_MODULE)
    backend = CpuBackend()
    plan = backend.compile(module, backend.capabilities())
    assert not plan.fallback_ops and "= fused_attention(" in plan.source
    generator = torch.Generator().manual_seed(1)
    args = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in
            (((1, 4, 9, 32), torch.bfloat16), ((1, 2, 20, 32), torch.bfloat16), ((1, 2, 20, 32), torch.bfloat16),
             ((4,), torch.float32))]
    attributes = dict(attention_op(module).attributes)
    truth = attention_reference(fp64(args), attributes, [])
    (got,) = plan(*args)
    assert relative_error(got, truth) <= TOLERANCE[torch.bfloat16]


def test_emit_mlir_shows_the_attention_kernel():
    module = parse_module(ATTENTION_MODULE)
    text = CpuBackend().emit(module, CpuBackend().capabilities(), "mlir")
    assert "func.func @main_fused_attention_0(" in text and "vector.fma" in text
    jit.parse_check(text)
    assert print_module(module) == print_module(parse_module(ATTENTION_MODULE))  # emitting changes nothing
