"""mode="reduce-overhead": which compiled graphs run through CUDA graphs, reading which inputs in place.

A graph runs through CUDA graphs (flagtree/runtime/cudagraphs.py) when all its tensor inputs
are cuda tensors and its backend says its executables can be recorded (`Backend.cuda_graphs`:
the cuda and rocm backends). Elsewhere (cpu, interpret, the reference backend) it runs as
usual. Either way its report notes it: "cuda_graphs", or "cuda_graphs not applied: WHY".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flagtree.backends.base import Backend
from flagtree.runtime.cudagraphs import CudaGraphRunner

CUDA_GRAPHS_NOTE = "cuda_graphs"


@dataclass(frozen=True)
class CudaGraphRequest:
    """Run a graph through CUDA graphs where they apply.

    static_inputs: indices of the aten graph's inputs that keep their address from call to
    call (parameters and buffers), which the recorded graph reads in place instead of copying.
    """

    static_inputs: frozenset[int]


def cuda_graph_request(kind: str) -> CudaGraphRequest:
    """The request for an aten graph of `kind` ("inference", "forward" or "backward").

    aot_autograd reports a forward or inference graph's parameters and buffers in the tracing
    context (as it does for Inductor's CUDA graphs). A backward graph gets none: its inputs
    (saved activations, gradients) are new tensors every step, and the context it compiles in
    still describes the forward's inputs.
    """
    if kind == "backward":
        return CudaGraphRequest(frozenset())
    context = torch._guards.TracingContext.try_get()
    metadata = context.fw_metadata if context is not None else None
    return CudaGraphRequest(frozenset(metadata.static_input_indices if metadata is not None else ()))


def unavailable_reason(backend: Backend, graph_inputs: Sequence[Any]) -> str | None:
    """Why CUDA graphs cannot record a graph run by `backend` on these inputs, or None when they can."""
    tensors = [(index, v) for index, v in enumerate(graph_inputs) if isinstance(v, torch.Tensor)]
    if not tensors:
        return "the graph has no tensor inputs, so nothing places it on a cuda device"
    for index, tensor in tensors:
        # A 0-d tensor on the CPU (an unspecialised Python float) is copied to the device per call.
        if tensor.device.type != "cuda" and not (tensor.dim() == 0 and tensor.device.type == "cpu"):
            return f"input {index} is on {tensor.device.type}; CUDA graphs record work on cuda tensors only"
    if not backend.cuda_graphs:
        return f"the {backend.name} backend's executables cannot be recorded into CUDA graphs"
    return None


def with_cuda_graphs(
    executable: Any,
    graph: str,
    backend: Backend,
    example_inputs: Sequence[Any],
    arg_indices: Sequence[int],
    request: CudaGraphRequest,
) -> tuple[Any, str]:
    """`executable` (which takes the aten graph's inputs at `arg_indices`) run through CUDA
    graphs where they apply, else unchanged; and the report note that says which."""
    reason = unavailable_reason(backend, [example_inputs[i] for i in arg_indices])
    if reason is not None:
        return executable, f"{CUDA_GRAPHS_NOTE} not applied: {reason}"
    static = [position for position, index in enumerate(arg_indices) if index in request.static_inputs]
    return CudaGraphRunner(executable, graph, static), CUDA_GRAPHS_NOTE
