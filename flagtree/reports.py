"""What each compiled graph became: fusions, fallbacks, op counts and time per pass.

`flagtree.reports()` returns the reports of the graphs compiled since the last
`flagtree.clear_reports()`; each compile also logs `Report.summary()` to the `flagtree`
logger at INFO level, and writes `report.json` beside its dump when dumping is on.

`flagtree.reports` is the function; import this module's names with
`from flagtree.reports import Report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field

logger = logging.getLogger("flagtree")


@dataclass
class Report:
    """One compiled graph.

    graph: `graph_<n>_<forward|backward|inference>`; n counts Dynamo graphs in this process.
    backend: the backend that runs it ("reference" until a codegen backend claims the device;
      "eager" for a graph FTIR cannot express, which torch runs itself: fallbacks names why).
    pipeline: the pass pipeline that ran.
    fusions: fused op (short name, e.g. "attention") → count after the pipeline.
    fallbacks: aten op (`aten.convolution_backward.default`) → count of `ft.torch_call`s.
    fallback_reasons: aten op → why the importer did not map it.
    kernel_fallbacks: "FTIR op (why)" → count of the ops the backend runs in eager torch
      instead of its own kernels (a region its code generator cannot compile, a fused op it has
      no kernel for).
    op_counts: FTIR op → count after the pipeline.
    pass_times: pass name → wall seconds.
    compile_seconds: import + pipeline + verification + backend compile.
    dump_dir: this graph's dump folder, or None when dumping is off.
    notes: how the graph runs beyond its kernels: "cuda_graphs" when mode="reduce-overhead"
      records it into CUDA graphs, "cuda_graphs not applied: WHY" when they do not apply.
    """

    graph: str
    backend: str
    pipeline: str = ""
    fusions: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    fallback_reasons: dict[str, str] = field(default_factory=dict)
    kernel_fallbacks: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    pass_times: dict[str, float] = field(default_factory=dict)
    compile_seconds: float = 0.0
    dump_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: graph, backend, size, fusions, fallbacks, times and notes."""
        ops = sum(self.op_counts.values())
        passes = sum(self.pass_times.values())
        return (
            f"flagtree {self.graph}: backend={self.backend}, {ops} ops, fusions: {_counts(self.fusions)}, "
            f"fallbacks: {_counts(self.fallbacks)}, kernel fallbacks: {_counts(self.kernel_fallbacks)}, "
            f"passes {passes * 1e3:.1f} ms, "
            f"compile {self.compile_seconds * 1e3:.1f} ms" + (f", dumped to {self.dump_dir}" if self.dump_dir else "")
            + (f", notes: {'; '.join(self.notes)}" if self.notes else "")
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}×{n}" for name, n in sorted(counts.items())) or "none"


_lock = threading.Lock()
_reports: list[Report] = []


def record(report: Report) -> None:
    """Keep `report` for `reports()` and log its summary."""
    with _lock:
        _reports.append(report)
    logger.info(report.summary())


def reports() -> list[Report]:
    """Reports of the graphs compiled since the last `clear_reports()`, oldest first."""
    with _lock:
        return list(_reports)


def clear_reports() -> None:
    """Forget the reports collected so far."""
    with _lock:
        _reports.clear()
