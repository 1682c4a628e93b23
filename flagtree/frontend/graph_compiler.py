"""Compile one aten graph: import to FTIR, run the pass pipeline, verify, hand it to a backend.

With a dump folder, every stage is written to `DIR/graph_<n>_<kind>/`:

    fx_graph.py      the aten graph aot_autograd produced (readable Python)
    input.ftir       the FTIR right after import
    passes/main/NN_<pass>_before.ftir, NN_<pass>_after.ftir   around each pass
    output.ftir      the FTIR the backend receives
    plan.py          the backend's launch plan (`flagtree-opt --emit=python` of output.ftir), when it has one
    kernels.<form>   the generated kernels in each form the backend emits (kernels.mlir, kernels.triton)
    report.json      the graph's Report (fusions, fallbacks, op counts, pass times)
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from flagtree.backends.base import Backend, Capabilities
from flagtree.backends.registry import select_backend
from flagtree.errors import FlagtreeError
from flagtree.frontend.importer import ConstantOutput, UnsupportedGraph, import_graph
from flagtree.frontend.options import CompileOptions
from flagtree.frontend.reduce_overhead import CudaGraphRequest, with_cuda_graphs
from flagtree.ir.core import Module
from flagtree.ir.opdef import FUSED, has_trait
from flagtree.ir.ops.misc import fallback_name
from flagtree.ir.printer import print_module
from flagtree.ir.verifier import verify
from flagtree.passes import IRPrinting, PassManager, all_passes, preset_pipeline
from flagtree.reports import Report, record

_STRUCTURE_OPS = frozenset({"builtin.module", "func.func", "func.return"})


class CompiledGraph:
    """What aot_autograd calls: boxed arguments in, the graph's outputs out."""

    def __init__(self, executable: Any, arg_indices: list[int], outputs: list[int | ConstantOutput]):
        # aot_autograd passes the argument list itself, which we may clear to free inputs
        # early. An instance attribute, so wrappers that copy __dict__ (Dynamo's disable) keep it.
        self._boxed_call = True
        self.executable = executable
        self.arg_indices = arg_indices
        self.outputs = outputs

    def __call__(self, args: list[Any]) -> list[Any]:
        inputs = [args[i] for i in self.arg_indices]
        args.clear()
        results = self.executable(*inputs)
        return [results[slot] if isinstance(slot, int) else slot.value for slot in self.outputs]


@dataclass(frozen=True)
class GraphDump:
    """The dump folder of one graph."""

    folder: Path

    def clear(self) -> None:
        """Remove what an earlier run wrote here (graph numbers restart in each process), so
        no stale pass file sits beside this compile's."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, name: str, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(text)


def compile_aten_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    graph: str,
    options: CompileOptions,
    constants: dict[int, tuple[str, torch.Tensor]] | None = None,
    cuda_graphs: CudaGraphRequest | None = None,
) -> CompiledGraph:
    """Compile the aten graph `gm` named `graph` (e.g. `graph_0_forward`) for the device of
    `example_inputs`, on the backend the registry selects. With `cuda_graphs`
    (mode="reduce-overhead") it runs through CUDA graphs where they apply, and its report
    notes whether they do."""
    start = time.perf_counter()
    dump = GraphDump(Path(options.dump_dir) / graph) if options.dump_dir else None
    # aot_autograd calls compilers under its FakeTensorMode; FTIR constants are real tensors.
    with unset_fake_temporarily():
        if dump:
            dump.clear()
            dump.write("fx_graph.py", gm.print_readable(print_output=False))
        try:
            imported = import_graph(gm, constants)
        except UnsupportedGraph as unsupported:
            return _eager_graph(gm, graph, unsupported, constants or {}, start, dump, cuda_graphs is not None)
        module = imported.module
        verify(module)
        if dump:
            dump.write("input.ftir", print_module(module, print_locations=True))
        backend = select_backend(_device_of(example_inputs), options.target)
        capabilities = backend.capabilities(_device_of(example_inputs))
        pipeline = options.pipeline if options.pipeline is not None else preset_pipeline(options.opt_level)
        pipeline = ",".join(p for p in (pipeline, backend.pipeline(capabilities)) if p)
        pass_times = _run_pipeline(module, pipeline, options, dump)
        verify(module)
        if dump:
            dump.write("output.ftir", print_module(module, print_locations=True))
        executable = backend.compile(module, capabilities)
        if dump:
            _dump_generated_code(dump, backend, module, capabilities, executable)
    report = _report(graph, backend.name, module, pipeline, pass_times, imported.fallback_reasons, dump)
    # ft.torch_calls are already in report.fallbacks, under the same names
    report.kernel_fallbacks = {op: n for op, n in getattr(executable, "fallback_ops", {}).items()
                               if op not in report.fallbacks}
    if cuda_graphs is not None:
        executable, note = with_cuda_graphs(executable, graph, backend, example_inputs, imported.arg_indices,
                                            cuda_graphs)
        report.notes.append(note)
    report.compile_seconds = time.perf_counter() - start
    _publish(report, dump)
    return CompiledGraph(executable, imported.arg_indices, imported.outputs)


def _publish(report: Report, dump: GraphDump | None) -> None:
    """Add `report` to flagtree.reports(), and to the graph's dump folder."""
    record(report)
    if dump:
        dump.write("report.json", report.to_json())


class EagerGraph:
    """An aten graph torch runs itself (see UnsupportedGraph), frozen constants put back in place."""

    backend = "eager"

    def __init__(self, gm: fx.GraphModule, constants: dict[int, tuple[str, torch.Tensor]], arguments: int):
        self.gm = gm
        self.constants = constants
        self.arguments = arguments

    def __call__(self, *inputs: Any) -> list[Any]:
        given = iter(inputs)
        args = [self.constants[i][1] if i in self.constants else next(given) for i in range(self.arguments)]
        return list(self.gm(*args))


def _eager_graph(gm: fx.GraphModule, graph: str, unsupported: UnsupportedGraph,
                 constants: dict[int, tuple[str, torch.Tensor]], start: float, dump: GraphDump | None,
                 cuda_graphs_requested: bool) -> CompiledGraph:
    """`gm` run by eager torch, reported as one fallback of the construct FTIR cannot express."""
    arguments = sum(1 for node in gm.graph.nodes if node.op == "placeholder")
    outputs = len(next(node for node in gm.graph.nodes if node.op == "output").args[0])
    report = Report(graph, EagerGraph.backend, fallbacks={unsupported.construct: 1},
                    fallback_reasons={unsupported.construct: f"the whole graph runs in eager torch: {unsupported}"},
                    compile_seconds=time.perf_counter() - start, dump_dir=str(dump.folder) if dump else None)
    if cuda_graphs_requested:
        report.notes.append("cuda_graphs not applied: the graph runs in eager torch")
    _publish(report, dump)
    return CompiledGraph(EagerGraph(gm, constants, arguments), [i for i in range(arguments) if i not in constants],
                         list(range(outputs)))


def _dump_generated_code(dump: GraphDump, backend: Backend, module: Module, capabilities: Capabilities,
                         executable: Any) -> None:
    """The launch plan and the kernels' source, as `flagtree-opt --emit=FORM` prints them."""
    if isinstance(getattr(executable, "source", None), str):
        dump.write("plan.py", executable.source)
    for form in backend.emit_forms():
        if form == "python":
            continue
        try:
            text = backend.emit(module, capabilities, form)
        except FlagtreeError as e:  # the graph runs; only this artifact could not be printed
            text = f"// flagtree could not emit {form} for this graph: {e}\n"
        dump.write(f"kernels.{form}", text)


def _run_pipeline(module: Module, pipeline: str, options: CompileOptions, dump: GraphDump | None) -> dict[str, float]:
    """Run `pipeline` over `module` in place; returns seconds per pass."""
    printing = None
    if dump:
        printing = IRPrinting(before=frozenset(all_passes()), after_all=True, print_locations=True,
                              tree_dir=str(dump.folder / "passes"))
    manager = PassManager(pipeline, verify_each=options.verify_each, printing=printing,
                          reproducer_dir=str(dump.folder) if dump else None)
    return manager.run(module).pass_times


def _device_of(example_inputs: Sequence[Any]) -> torch.device:
    """The device the graph runs on: that of its first tensor input (CPU when it has none)."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _fusion_kind(op: Any) -> str:
    """A fused op's kind for reports: its name without the dialect (`attention`), or for a
    codegen group (`ft.fusion`) what it groups, e.g. `elementwise_group`."""
    if op.name == "ft.fusion":
        return f"{op.attributes.get('kind', 'elementwise')}_group"
    return op.short_name


def _report(
    graph: str,
    backend: str,
    module: Module,
    pipeline: str,
    pass_times: dict[str, float],
    fallback_reasons: dict[str, str],
    dump: GraphDump | None,
) -> Report:
    ops = [op for op in module.walk() if op.name not in _STRUCTURE_OPS]
    fallbacks = Counter(fallback_name(op) for op in ops if op.name == "ft.torch_call")
    return Report(
        graph=graph,
        backend=backend,
        pipeline=pipeline,
        fusions=dict(Counter(_fusion_kind(op) for op in ops if has_trait(op, FUSED) or op.name == "ft.fusion")),
        fallbacks=dict(fallbacks),
        fallback_reasons={name: reason for name, reason in fallback_reasons.items() if name in fallbacks},
        op_counts=dict(Counter(op.name for op in ops)),
        pass_times=dict(pass_times),
        dump_dir=str(dump.folder) if dump else None,
    )
