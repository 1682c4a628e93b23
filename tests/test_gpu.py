"""The cuda backend on a real GPU: the example zoo against fp64, also through CUDA graphs
(mode="reduce-overhead").

Skipped without a CUDA GPU (CI has none); run on the GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

import flagtree
from examples.zoo import ZOO
from flagtree.runtime.cudagraphs import CudaGraphRunner, cuda_graph_stats, reset_cuda_graph_stats
from tests.frontend_helpers import assert_matches_fp64, fp64_twin
from tests.test_training import assert_gradients_match_fp64, training_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 CNN: BatchNorm in bf16 drifts beyond the bf16 tolerance in eager torch as well.
CASES = [(name, dtype) for name in ZOO for dtype in (torch.float32, torch.bfloat16)
         if (name, dtype) != ("cnn", torch.bfloat16)]


def _fp64_outputs(name: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    twin, twin_inputs = fp64_twin(model, inputs)
    with torch.no_grad():
        return twin(*twin_inputs)


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_zoo_on_cuda_matches_fp64(name, dtype):
    torch._dynamo.reset()
    flagtree.clear_reports()
    model, inputs = ZOO[name](dtype=dtype, device="cuda")
    compiled = torch.compile(model, backend="flagtree")
    with torch.no_grad():
        actual = compiled(*inputs)
    assert_matches_fp64(actual, _fp64_outputs(name, model, inputs), dtype, name)
    assert {r.backend for r in flagtree.reports()} == {"cuda"}



# ------------------------------------------------------------------------ mode="reduce-overhead"
@pytest.fixture
def fresh_cuda_graph_stats():
    flagtree.clear_reports()
    reset_cuda_graph_stats()


def _reduce_overhead(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    return torch.compile(model, backend="flagtree", mode="reduce-overhead", **kwargs)


@pytest.mark.parametrize("name", list(ZOO))
def test_reduce_overhead_replays_match_fp64_and_leave_earlier_outputs_alone(name, fresh_cuda_graph_stats):
    model, inputs = ZOO[name](device="cuda")
    compiled = _reduce_overhead(model)
    batches = [tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs) for _ in range(4)]
    with torch.no_grad():
        outputs = [compiled(*batch) for batch in batches]  # warm-up, record (and replay), replay, replay
    for batch, output in zip(batches, outputs):
        assert_matches_fp64(output, _fp64_outputs(name, model, batch), torch.float32, f"{name} reduce-overhead")
    graphs = len(flagtree.reports())
    stats = cuda_graph_stats()
    assert stats.not_recorded == {}
    assert (stats.recorded, stats.rerecorded, stats.replays) == (graphs, 0, 3 * graphs)
    assert all(r.notes == ["cuda_graphs"] for r in flagtree.reports())


def test_reduce_overhead_reads_parameters_in_place_and_records_a_moved_one_again(fresh_cuda_graph_stats):
    model, (x,) = ZOO["mlp"](device="cuda")
    compiled = _reduce_overhead(model)
    with torch.no_grad():
        compiled(x), compiled(x)
        model.fc1.weight.mul_(2)  # an optimizer step: same address, read in place
        assert_matches_fp64(compiled(x), _fp64_outputs("mlp", model, (x,)), torch.float32, "after an in-place update")
        assert (cuda_graph_stats().recorded, cuda_graph_stats().rerecorded) == (1, 0)
        model.fc1.weight.data = -model.fc1.weight.data  # the same parameter at a new address
        for _ in range(2):
            assert_matches_fp64(compiled(x), _fp64_outputs("mlp", model, (x,)), torch.float32, "after a move")
    assert (cuda_graph_stats().recorded, cuda_graph_stats().rerecorded) == (2, 1)
    assert len(flagtree.reports()) == 1, "moving a parameter recompiled"


def test_reduce_overhead_records_a_dynamic_model_once_per_signature(fresh_cuda_graph_stats):
    model, (x,) = ZOO["transformer_block"](device="cuda")
    compiled = _reduce_overhead(model, dynamic=True)
    with torch.no_grad():
        for length in (8, 13, 8, 13, 8, 13):
            xi = torch.randn(x.shape[0], length, x.shape[2], device="cuda")
            assert_matches_fp64(compiled(xi), _fp64_outputs("transformer_block", model, (xi,)), torch.float32,
                                f"transformer_block at length {length}")
    assert len(flagtree.reports()) == 1, "the second length recompiled"
    stats = cuda_graph_stats()
    assert stats.not_recorded == {}
    assert (stats.recorded, stats.replays) == (2, 4)


def test_reduce_overhead_training_steps_match_fp64(fresh_cuda_graph_stats):
    model, (x,) = ZOO["mlp"](device="cuda")
    compiled = _reduce_overhead(model)
    for step in range(3):
        xi = torch.randn_like(x)
        twin, twin_inputs = fp64_twin(model, (xi,))
        _, reference_grads = training_step(twin, twin, twin_inputs)
        model.zero_grad()
        _, grads = training_step(model, compiled, (xi,))
        assert_gradients_match_fp64(grads, reference_grads, torch.float32, f"reduce-overhead training step {step}")
    stats = cuda_graph_stats()
    assert stats.not_recorded == {}
    assert (stats.recorded, stats.rerecorded, stats.replays) == (2, 0, 4)  # forward and backward


def test_a_plan_that_waits_on_the_host_runs_without_cuda_graphs(fresh_cuda_graph_stats):
    class WaitsOnTheHost:
        backend = "test"

        def __call__(self, x):
            return [x * x.sum().item()]  # .item() synchronises: not allowed while recording

    run = CudaGraphRunner(WaitsOnTheHost(), "graph_sync")
    stream = torch.cuda.current_stream()
    for _ in range(3):
        x = torch.randn(64, device="cuda")
        torch.testing.assert_close(run(x)[0], x * x.sum().item())
    assert run.not_recorded is not None and run.not_recorded.startswith("recording failed: ")
    assert cuda_graph_stats().not_recorded == {"graph_sync": run.not_recorded}
    assert torch.cuda.current_stream() == stream, "the failed recording left its capture stream current"


# ------------------------------------------------------------ attention launches past Triton's JIT
def _attention_inputs(heads: int, kv_heads: int, sq: int, skv: int, dqk: int, dv: int, kv_shared: bool = False):
    q = torch.randn(1, heads, sq, dqk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, skv, dqk, device="cuda", dtype=torch.bfloat16)
    v = k if kv_shared else torch.randn(1, kv_heads, skv, dv, device="cuda", dtype=torch.bfloat16)
    return q, k, v


@pytest.mark.parametrize("case", ["online", "descriptors", "split_kv", "one_block"])
def test_attention_calls_after_the_first_match_a_fresh_jit_launch_bit_for_bit(case):
    """FixedLaunch sends a signature's first call through Triton's JIT and later ones straight to
    the compiled kernel: a later call on fresh inputs gives exactly what a fresh object's first
    (JIT) call gives on them, for each kernel path, including split-KV's combine kernel."""
    from flagtree.backends.registry import get_backend
    from flagtree.backends.triton.attention import AttentionConfig, FlashAttention

    backend = get_backend("cuda")
    caps = backend.capabilities()
    shapes = {"online": (8, 2, 300, 300, 128, 128), "descriptors": (8, 2, 300, 300, 192, 128),
              "split_kv": (16, 1, 1, 4096, 128, 128), "one_block": (16, 1, 64, 64, 512, 512)}[case]
    configs = {"online": AttentionConfig(128, 64, 1, 8, 3), "descriptors": AttentionConfig(128, 64, 1, 8, 3, tma=True),
               "split_kv": AttentionConfig(16, 64, 16, 4, 2), "one_block": AttentionConfig(64, 64, 16, 4, 3, 64)}
    kwargs = dict(scale=0.1, causal="lower_right", window=0, config=configs[case])
    q, k, v = _attention_inputs(*shapes, kv_shared=case == "one_block")
    launch = FlashAttention(backend.name, backend.jit, caps)._plan(*_plan_arguments(q, k, v, kwargs))
    launch(q, k, v, None, None)  # through the JIT
    q, k, v = _attention_inputs(*shapes, kv_shared=case == "one_block")
    out = launch(q, k, v, None, None)  # straight to the compiled kernels
    expected = FlashAttention(backend.name, backend.jit, caps).run(q, k, v, None, None, **kwargs)
    if case == "split_kv":
        assert launch.splits > 1
    assert torch.equal(out, expected)


def _plan_arguments(q, k, v, kwargs):
    from flagtree.backends.triton.attention import attention_class

    shape = attention_class(q, k, v, kwargs["causal"], kwargs["window"], False)
    return (shape, q, k, v, None, None, kwargs["scale"], kwargs["causal"], kwargs["window"], kwargs["config"], None)


def test_attention_backward_calls_after_the_first_match_a_fresh_jit_launch_bit_for_bit():
    from flagtree.backends.registry import get_backend
    from flagtree.backends.triton.attention import flash_attention
    from flagtree.backends.triton.attention_backward import BackwardConfig, FlashAttentionBackward

    backend = get_backend("cuda")
    caps = backend.capabilities()
    configs = (BackwardConfig(128, 64, 8, 3), BackwardConfig(64, 64, 4, 2))
    kwargs = dict(scale=0.1, causal="upper_left", window=0)
    warm = FlashAttentionBackward(backend.name, backend.jit, caps)
    for _ in range(2):
        q, k, v = _attention_inputs(8, 2, 333, 333, 192, 128)
        out, lse = flash_attention(backend.name, backend.jit, caps)(q, k, v, **kwargs, with_lse=True)
        grad = torch.randn_like(out)
        grads = warm(q, k, v, out, grad, lse, **kwargs, configs=configs)
    expected = FlashAttentionBackward(backend.name, backend.jit, caps)(q, k, v, out, grad, lse, **kwargs,
                                                                        configs=configs)
    for actual, reference in zip(grads, expected):
        assert torch.equal(actual, reference)
