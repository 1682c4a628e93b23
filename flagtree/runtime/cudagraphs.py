"""CUDA graphs for `torch.compile(mode="reduce-overhead")`: a launch plan replayed as one graph launch.

A plan launches many small kernels; for decode-sized inputs the CPU time of those launches
dominates. `CudaGraphRunner` records the plan once per input signature (shapes, strides,
dtypes, devices and the values of scalar inputs such as symbolic sizes) and replays it:

- the first call of a signature runs the plan normally: Triton compiles and the attention
  kernels tune there, which must not happen while a graph is being recorded;
- the second call records the plan, reading its inputs from buffers the runner owns;
- that call and every later one copies the inputs into those buffers, replays the graph,
  and returns copies of the outputs: the next replay overwrites the graph's own output
  memory, and the caller must never see that.

Static inputs (the parameters and buffers aot_autograd reports) are not copied: the graph
reads them where they live, so in-place updates (an optimizer step) are seen. If one of
them moves, the signature is recorded again; past `RERECORD_LIMIT` moves the runner stops
using CUDA graphs. A plan that cannot be recorded (an eager fallback op that synchronises
with the host, say) runs without a graph from then on. Both are logged once as a warning to
the `flagtree` logger and kept in `cuda_graph_stats().not_recorded`, keyed by graph name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("flagtree")

# Recording again costs a device synchronisation and a capture; a static input that moves
# this often is not static, and CUDA graphs would cost more than they save.
RERECORD_LIMIT = 16

Signature = tuple[Any, ...]
# Records `run()` on a device; returns the replay and the outputs each replay writes.
Recorder = Callable[[Callable[[], list[Any]], torch.device], tuple[Callable[[], None], list[Any]]]


class RecordingFailed(Exception):
    """The plan could not be recorded into a CUDA graph; the message says why."""


@dataclass
class CudaGraphStats:
    """What mode="reduce-overhead" did in this process.

    recorded: CUDA graphs recorded (one per graph and input signature, plus re-records).
    rerecorded: of those, recorded again because a static input (parameter or buffer) moved.
    replays: calls served by replaying a recorded graph.
    not_recorded: graph name → why it runs without CUDA graphs.
    """

    recorded: int = 0
    rerecorded: int = 0
    replays: int = 0
    not_recorded: dict[str, str] = field(default_factory=dict)


_stats = CudaGraphStats()


def cuda_graph_stats() -> CudaGraphStats:
    """A snapshot of this process's CUDA graph counters."""
    return dataclasses.replace(_stats, not_recorded=dict(_stats.not_recorded))


def reset_cuda_graph_stats() -> None:
    """Start the counters again from zero."""
    global _stats
    _stats = CudaGraphStats()


def record_cuda_graph(run: Callable[[], list[Any]], device: torch.device) -> tuple[Callable[[], None], list[Any]]:
    """Record `run()` into a CUDA graph on `device`, after one warm-up run on the capture
    stream (lazy initialisation and first allocations must not happen during capture).

    The capture is begun and ended by hand rather than with `torch.cuda.graph`, whose exit
    leaves the capture stream current when ending a failed capture raises.
    """
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # A capture puts the device's random generator in capture mode, and only a capture that
        # ends well takes it out again; after a broken one, every later random draw on the device
        # would fail ("Offset increment outside graph capture"), so its state is put back.
        generator = torch.cuda.default_generators[device.index if device.index is not None else
                                                  torch.cuda.current_device()]
        generator_state = generator.clone_state()
        try:
            with torch.cuda.stream(stream):
                # Only this thread's unsafe calls break the capture, not, say, a data loader's
                # pinned-memory thread (Inductor's CUDA graphs make the same choice).
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    outputs = run()
                finally:
                    graph.capture_end()
        except Exception as e:  # whatever broke the capture, the plan still runs without a graph
            generator.graphsafe_set_state(generator_state)
            raise RecordingFailed(_root_cause(e)) from e
    return graph.replay, outputs


def _root_cause(error: BaseException) -> str:
    """The first error of a chain (ending a broken capture raises again), on one line."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class _InputView:
    """A recorded output that views the memory of input `position`, `byte_offset` bytes from
    that input's first element (a graph may return an input or a view of one)."""

    position: int
    byte_offset: int


@dataclass
class _Recording:
    replay: Callable[[], None]
    copied_inputs: list[tuple[int, torch.Tensor]]  # (input position, the buffer the graph reads it from)
    static_addresses: dict[int, int]  # static input position → the address the graph reads
    outputs: list[Any]  # what the graph writes on each replay (and non-tensor results)
    views: list[_InputView | None]  # per output: the input it views, None when it is graph memory


class CudaGraphRunner:
    """Runs an executable (`executable(*inputs) -> list`) through CUDA graphs, one recording
    per input signature. `static_inputs` are positions of inputs that keep their address from
    call to call; `record` is the recorder (tests pass one that needs no GPU)."""

    def __init__(self, executable: Any, graph: str, static_inputs: Sequence[int] = (),
                 record: Recorder = record_cuda_graph):
        self.executable = executable
        self.backend = executable.backend
        self.graph = graph
        self.static_inputs = frozenset(static_inputs)
        self.record = record
        self.not_recorded: str | None = None
        self._warmed_up: set[Signature] = set()
        self._recordings: dict[Signature, _Recording] = {}
        self._rerecords = 0

    def __call__(self, *inputs: Any) -> list[Any]:
        if self.not_recorded is not None:
            return self.executable(*inputs)
        signature = input_signature(inputs)
        if signature not in self._warmed_up:
            self._warmed_up.add(signature)
            return self.executable(*inputs)
        recording = self._recording_for(signature, inputs)
        if recording is None:
            return self.executable(*inputs)
        _copy_inputs(recording.copied_inputs, inputs)
        recording.replay()
        _stats.replays += 1
        return _fresh_outputs(recording, inputs)

    def _recording_for(self, signature: Signature, inputs: Sequence[Any]) -> _Recording | None:
        """The recording that serves these inputs, made now if need be; None once the runner gave up."""
        recording = self._recordings.get(signature)
        if recording is None:
            return self._record(signature, inputs)
        if all(inputs[p].data_ptr() == address for p, address in recording.static_addresses.items()):
            return recording
        return self._record_again(signature, inputs)

    def _record_again(self, signature: Signature, inputs: Sequence[Any]) -> _Recording | None:
        del self._recordings[signature]  # free the old graph's memory before recording the new one
        self._rerecords += 1
        if self._rerecords > RERECORD_LIMIT:
            self._give_up(f"its static inputs (parameters, buffers) moved more than {RERECORD_LIMIT} times")
            return None
        _stats.rerecorded += 1
        return self._record(signature, inputs)

    def _record(self, signature: Signature, inputs: Sequence[Any]) -> _Recording | None:
        statics = {p for p in self.static_inputs if isinstance(inputs[p], torch.Tensor)}
        device = _device_of(inputs)
        # Buffers are ordinary tensors even when recorded under inference_mode, so a later call
        # outside it may still copy into them.  All live on the graph's device: a 0-d CPU input
        # (an unspecialised Python float) is copied there before each replay.
        with torch.inference_mode(False):
            copied = [(p, torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device))
                      for p, v in enumerate(inputs) if isinstance(v, torch.Tensor) and p not in statics]
        _copy_inputs(copied, inputs)  # the warm-up run before recording computes on real values
        graph_inputs = list(inputs)
        for position, buffer in copied:
            graph_inputs[position] = buffer
        try:
            replay, outputs = self.record(lambda: self.executable(*graph_inputs), device)
        except RecordingFailed as e:
            self._give_up(f"recording failed: {e}")
            return None
        recording = _Recording(replay, copied, {p: inputs[p].data_ptr() for p in statics}, list(outputs),
                               [_input_viewed_by(o, graph_inputs) for o in outputs])
        self._recordings[signature] = recording
        _stats.recorded += 1
        return recording

    def _give_up(self, reason: str) -> None:
        self.not_recorded = reason
        self._recordings.clear()
        _stats.not_recorded[self.graph] = reason
        logger.warning("flagtree %s: mode='reduce-overhead' runs it without CUDA graphs from now on: %s",
                       self.graph, reason)


def input_signature(inputs: Sequence[Any]) -> Signature:
    """What a recording depends on: each tensor's shape, strides, dtype and device, and the
    value of every other input (symbolic sizes arrive as ints)."""
    return tuple((tuple(v.shape), v.stride(), v.dtype, v.device) if isinstance(v, torch.Tensor) else (type(v), v)
                 for v in inputs)


def _device_of(inputs: Sequence[Any]) -> torch.device:
    """The device the graph runs on: that of its first tensor of rank > 0 (else its first tensor)."""
    tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
    return next((v.device for v in tensors if v.dim() > 0), tensors[0].device)


def _copy_inputs(buffers: list[tuple[int, torch.Tensor]], inputs: Sequence[Any]) -> None:
    with torch.no_grad():  # data movement only: autograd must not record it on the buffers
        for position, buffer in buffers:
            _without_broadcast_dims(buffer).copy_(_without_broadcast_dims(inputs[position]))


def _without_broadcast_dims(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with each stride-0 (expanded) dim narrowed to one element: copy_ refuses to
    write a tensor whose elements share memory, and one element holds all of them."""
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
        if stride == 0 and size > 1:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


def _input_viewed_by(output: Any, graph_inputs: Sequence[Any]) -> _InputView | None:
    if not isinstance(output, torch.Tensor):
        return None
    storage = output.untyped_storage().data_ptr()
    for position, value in enumerate(graph_inputs):
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
            return _InputView(position, output.data_ptr() - value.data_ptr())
    return None


def _fresh_outputs(recording: _Recording, inputs: Sequence[Any]) -> list[Any]:
    """The outputs of the replay just done, in memory the graph does not own.

    Each storage the outputs live in is copied once, and every output is rebuilt on its copy
    with its recorded offset, sizes and strides, so outputs that shared memory still do (as
    aot_autograd expects of outputs that alias each other). An output that views an input
    views the caller's tensor, as it would without the graph.
    """
    copies: dict[int, torch.UntypedStorage] = {}
    fresh = []
    for output, view in zip(recording.outputs, recording.views):
        if not isinstance(output, torch.Tensor):
            fresh.append(output)
        elif view is not None:
            source = inputs[view.position]
            start = source.data_ptr() - source.untyped_storage().data_ptr() + view.byte_offset
            fresh.append(_tensor_on(source.untyped_storage(), start // output.element_size(), output))
        else:
            key = output.untyped_storage().data_ptr()
            if key not in copies:
                copies[key] = output.untyped_storage().clone()
            fresh.append(_tensor_on(copies[key], output.storage_offset(), output))
    return fresh


def _tensor_on(storage: torch.UntypedStorage, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor with `like`'s dtype, sizes and strides on `storage`, `offset` elements in."""
    return torch.empty(0, dtype=like.dtype, device=like.device).set_(storage, offset, like.shape, like.stride())
