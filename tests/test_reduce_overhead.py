"""mode="reduce-overhead" without a GPU.

The mode is accepted, and where CUDA graphs do not apply (CPU tensors, the reference
backend) graphs run as usual with the reason in their report. The runner's own logic
(signatures, static inputs, output copies) is tested on CPU plans through a recorder with
a CUDA graph's memory semantics: a replay recomputes from the very input tensors the
recording read, and writes into the very output tensors it returned. The real recorder is
exercised by tests/test_gpu.py.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flagtree
from examples.zoo import ZOO
from flagtree.backends.cuda.backend import CudaBackend
from flagtree.backends.registry import get_backend
from flagtree.errors import OptionsError
from flagtree.frontend import reduce_overhead
from flagtree.frontend.backend import flagtree_backend
from flagtree.frontend.options import check_mode
from flagtree.frontend.reduce_overhead import CudaGraphRequest, unavailable_reason, with_cuda_graphs
from flagtree.runtime.cudagraphs import (
    RERECORD_LIMIT,
    CudaGraphRunner,
    RecordingFailed,
    cuda_graph_stats,
    reset_cuda_graph_stats,
)
from tests.frontend_helpers import assert_matches_fp64, fp64_twin
from tests.test_training import assert_gradients_match_fp64, training_step


def record_like_a_cuda_graph(run, device):
    """A recorder without a GPU that keeps a CUDA graph's memory semantics: one warm-up run
    (as the real recorder does), then a replay recomputes from the same input tensors and
    writes into the outputs the recording returned."""
    run()
    outputs = run()

    def replay():
        results = run()
        with torch.inference_mode():  # a replay writes memory, whatever the caller's autograd mode
            for recorded, fresh in zip(outputs, results):
                if isinstance(recorded, torch.Tensor):
                    recorded.copy_(fresh)

    return replay, outputs


class Plan:
    """An executable made of a Python function, counting its calls."""

    backend = "test"

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *inputs):
        self.calls += 1
        return self.function(*inputs)


def runner(function, static_inputs=(), record=record_like_a_cuda_graph) -> CudaGraphRunner:
    return CudaGraphRunner(Plan(function), "graph_test", static_inputs, record)


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_cuda_graph_stats()
    flagtree.clear_reports()


@pytest.fixture
def cuda_graphs_on_cpu(monkeypatch):
    """Compiles with mode="reduce-overhead" wrap CPU plans in the runner, with the recorder above."""
    monkeypatch.setattr(reduce_overhead, "unavailable_reason", lambda backend, inputs: None)
    monkeypatch.setattr(reduce_overhead, "CudaGraphRunner",
                        functools.partial(CudaGraphRunner, record=record_like_a_cuda_graph))


def compile_reduce_overhead(model, **kwargs):
    return torch.compile(model, backend="flagtree", mode="reduce-overhead", **kwargs)


def fresh_inputs(x: torch.Tensor, count: int, **shape) -> list[torch.Tensor]:
    return [torch.randn(shape.get("size", x.shape), generator=torch.Generator().manual_seed(seed)).to(x.dtype)
            for seed in range(count)]


# ------------------------------------------------------------------------------ the mode itself
def test_cpu_graphs_run_as_usual_and_the_report_says_why_cuda_graphs_do_not_apply():
    model, (x,) = ZOO["mlp"]()
    twin, (x64,) = fp64_twin(model, (x,))
    with torch.no_grad():
        assert_matches_fp64(compile_reduce_overhead(model)(x), twin(x64), torch.float32, "mlp")
    (report,) = flagtree.reports()
    assert report.notes == ["cuda_graphs not applied: input 0 is on cpu; CUDA graphs record work on cuda tensors only"]
    assert report.notes[0] in report.summary() and report.notes[0] in report.to_json()
    assert cuda_graph_stats().recorded == 0


def test_a_backend_that_cannot_be_recorded_is_named_even_on_cuda_tensors():
    with FakeTensorMode():
        x, w = torch.empty(4, 8, device="cuda"), torch.empty(8, 8, device="cuda")
        on_cpu = torch.empty(8)
    assert unavailable_reason(CudaBackend(), [x, 3, w]) is None
    assert "the reference backend's executables cannot be recorded" in unavailable_reason(get_backend("reference"),
                                                                                          [x, w])
    assert unavailable_reason(CudaBackend(), [x, on_cpu]).startswith("input 1 is on cpu")
    assert unavailable_reason(CudaBackend(), [x, torch.tensor(0.5)]) is None  # a 0-d CPU scalar is copied over
    assert "no tensor inputs" in unavailable_reason(CudaBackend(), [3])


def test_static_inputs_are_mapped_onto_the_arguments_the_graph_reads():
    with FakeTensorMode():
        inputs = [torch.empty(2, device="cuda") for _ in range(4)]
    inputs[1] = None  # a graph input the compiled graph does not take
    wrapped, note = with_cuda_graphs(Plan(None), "graph_0_inference", CudaBackend(), inputs, [0, 2, 3],
                                     CudaGraphRequest(frozenset({0, 3})))
    assert note == "cuda_graphs"
    assert isinstance(wrapped, CudaGraphRunner) and wrapped.static_inputs == {0, 2}


@pytest.mark.parametrize("mode", ["fast", "max-autotune", "max-autotune-no-cudagraphs"])
def test_other_modes_are_errors_that_list_the_valid_ones(mode):
    with pytest.raises(OptionsError, match=f"mode '{mode}' is not supported by flagtree.*; "
                                           "valid modes: default, reduce-overhead"):
        check_mode(mode)


# ------------------------------------------------------------------------------ compiled models
def test_replays_match_eager_on_fresh_inputs_and_leave_earlier_outputs_alone(cuda_graphs_on_cpu):
    model, (x,) = ZOO["mlp"]()
    compiled = compile_reduce_overhead(model)
    batches = fresh_inputs(x, 5)
    with torch.no_grad():
        outputs = [compiled(b) for b in batches]  # warm-up, record, then replays
        for batch, output in zip(batches, outputs):
            torch.testing.assert_close(output, model(batch))
    stats = cuda_graph_stats()
    assert (stats.recorded, stats.rerecorded, stats.replays) == (1, 0, 4)
    assert [r.notes for r in flagtree.reports()] == [["cuda_graphs"]]


def test_parameters_are_read_in_place_and_one_that_moves_is_recorded_again(cuda_graphs_on_cpu):
    model, (x,) = ZOO["mlp"]()
    compiled = compile_reduce_overhead(model)
    with torch.no_grad():
        compiled(x), compiled(x)
        model.fc1.weight.mul_(2)  # an optimizer step: same address
        torch.testing.assert_close(compiled(x), model(x))
        assert (cuda_graph_stats().recorded, cuda_graph_stats().rerecorded) == (1, 0)
        model.fc1.weight.data = model.fc1.weight.data * -1  # the same parameter at a new address
        torch.testing.assert_close(compiled(x), model(x))
        torch.testing.assert_close(compiled(x), model(x))
    assert (cuda_graph_stats().recorded, cuda_graph_stats().rerecorded) == (2, 1)
    assert len(flagtree.reports()) == 1, "moving a parameter recompiled"


def test_dynamic_shapes_record_once_per_signature(cuda_graphs_on_cpu):
    model, (x,) = ZOO["mlp"]()
    twin, _ = fp64_twin(model, (x,))
    compiled = compile_reduce_overhead(model, dynamic=True)
    with torch.no_grad():
        for batch in (5, 9, 5, 9, 5, 9):
            (xi,) = fresh_inputs(x, 1, size=(batch, x.shape[1]))
            assert_matches_fp64(compiled(xi), twin(xi.double()), torch.float32, f"mlp at batch {batch}")
    assert len(flagtree.reports()) == 1, "the second batch size recompiled"
    assert (cuda_graph_stats().recorded, cuda_graph_stats().replays) == (2, 4)


def test_training_steps_replay_forward_and_backward_with_gradients_matching_fp64(cuda_graphs_on_cpu):
    model, (x,) = ZOO["mlp"]()
    compiled = compile_reduce_overhead(model)
    for step, xi in enumerate(fresh_inputs(x, 3)):
        twin, twin_inputs = fp64_twin(copy.deepcopy(model), (xi,))
        _, reference_grads = training_step(twin, twin, twin_inputs)
        model.zero_grad()
        _, grads = training_step(model, compiled, (xi,))
        assert_gradients_match_fp64(grads, reference_grads, torch.float32, f"step {step}")
    assert [r.graph.rsplit("_", 1)[1] for r in flagtree.reports()] == ["forward", "backward"]
    assert (cuda_graph_stats().replays, cuda_graph_stats().rerecorded) == (4, 0)  # 2nd and 3rd forward and backward


# ------------------------------------------------------------------------------ the runner
def test_outputs_keep_their_aliasing_and_a_view_of_an_input_views_the_callers_tensor():
    def plan(x):
        y = x * 2
        return [y, y[1:].t(), x[1:], 5]

    run = runner(plan)
    inputs = [torch.randn(4, 3) for _ in range(4)]
    results = [run(x) for x in inputs]  # warm-up, record, replay, replay
    for x, (y, y_view, x_view, five) in zip(inputs, results):
        torch.testing.assert_close(y, x * 2)
        torch.testing.assert_close(y_view, (x * 2)[1:].t())
        assert y_view.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        assert (y_view.storage_offset(), y_view.stride()) == (3, (1, 3))
        assert x_view.data_ptr() == x[1:].data_ptr() and x_view.shape == (3, 3)
        assert five == 5
    assert results[2][0].data_ptr() != results[3][0].data_ptr(), "two replays returned the same memory"


def test_earlier_results_survive_later_replays():
    run = runner(lambda x: [x.exp()])
    inputs = [torch.randn(5) for _ in range(6)]
    results = [run(x)[0] for x in inputs]
    for x, result in zip(inputs, results):
        torch.testing.assert_close(result, x.exp())
    assert cuda_graph_stats().replays == 5


def test_expanded_inputs_are_copied_into_their_buffers():
    run = runner(lambda x: [x + 1])
    for _ in range(4):
        x = torch.randn(1, 3).expand(4, 3)
        torch.testing.assert_close(run(x)[0], x + 1)


def test_scalar_inputs_are_part_of_the_signature():
    run = runner(lambda x, n: [x * n])
    for n in (2, 3, 2, 3, 2, 3):
        x = torch.randn(4)
        torch.testing.assert_close(run(x, n)[0], x * n)
    assert (cuda_graph_stats().recorded, cuda_graph_stats().replays) == (2, 4)


def test_a_plan_that_cannot_be_recorded_runs_without_graphs_and_says_why(caplog):
    attempts = []

    def refuse(run, device):
        attempts.append(device)
        raise RecordingFailed("RuntimeError: operation not permitted when stream is capturing")

    run = runner(lambda x: [x.sin()], record=refuse)
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        for _ in range(4):
            x = torch.randn(3)
            torch.testing.assert_close(run(x)[0], x.sin())
    assert len(attempts) == 1, "recording was tried again after it failed"
    reason = "recording failed: RuntimeError: operation not permitted when stream is capturing"
    assert cuda_graph_stats().not_recorded == {"graph_test": reason}
    assert run.not_recorded == reason
    assert f"graph_test: mode='reduce-overhead' runs it without CUDA graphs from now on: {reason}" in caplog.text


def test_static_inputs_that_keep_moving_stop_the_recording(caplog):
    run = runner(lambda w, x: [x @ w], static_inputs=[0])
    x = torch.randn(2, 3)
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        for _ in range(RERECORD_LIMIT + 4):
            w = torch.randn(3, 3)
            torch.testing.assert_close(run(w, x)[0], x @ w)
    assert cuda_graph_stats().rerecorded == RERECORD_LIMIT
    assert "moved more than" in cuda_graph_stats().not_recorded["graph_test"]
    assert "moved more than" in caplog.text


def test_the_graph_reads_static_inputs_in_place_and_copies_the_others():
    addresses = []

    def plan(w, x):
        addresses.append((w.data_ptr(), x.data_ptr()))
        return [x @ w]

    run = runner(plan, static_inputs=[0])
    w = torch.randn(3, 3)
    run(w, torch.randn(2, 3)), run(w, torch.randn(2, 3))
    w.add_(1)  # an optimizer step: the replay sees it
    x = torch.randn(2, 3)
    torch.testing.assert_close(run(w, x)[0], x @ w)
    assert addresses[-1][0] == w.data_ptr() and addresses[-1][1] != x.data_ptr()
    assert cuda_graph_stats().rerecorded == 0


def test_calls_under_inference_mode_and_outside_share_one_recording():
    run = runner(lambda x: [x * 3])
    with torch.inference_mode():
        run(torch.randn(3)), run(torch.randn(3))
    x = torch.randn(3)
    torch.testing.assert_close(run(x)[0], x * 3)
    assert cuda_graph_stats().recorded == 1


def test_the_backend_function_takes_the_mode_directly():
    model, (x,) = ZOO["mlp"]()
    backend = functools.partial(flagtree_backend, options={"target": "reference"}, mode="reduce-overhead")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert flagtree.reports()[0].backend == "reference"
    assert flagtree.reports()[0].notes[0].startswith("cuda_graphs not applied: input 0 is on cpu")
