"""The pass manager: runs a pipeline over a module, with mlir-opt's debugging aids.

- IR printing before/after chosen passes (`IRPrinting`), to a stream or a file tree;
- `verify_each`: the verifier after every pass, blaming the pass that broke the IR;
- a crash reproducer: when a pass raises, the IR it received is written to a file and
  the error names the `flagtree-opt` command that replays the failure;
- per-pass wall times and an mlir-opt style timing report;
- an `after_pass` hook that sees the IR before and after each pass (--check-semantics).
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from flagtree.errors import OptionsError, PassError, VerificationError
from flagtree.ir.core import Module, Operation
from flagtree.ir.parser import clone_module
from flagtree.ir.printer import print_module, print_op
from flagtree.ir.verifier import verify
from flagtree.passes.base import Pass, all_passes
from flagtree.passes.pipeline import parse_pipeline

AfterPass = Callable[[str, Module, Module], None]


@dataclass(frozen=True)
class IRPrinting:
    """Which IR the pass manager prints, and where.

    before: names of passes to print the IR before.
    after: names of passes to print the IR after.
    after_all: print after every pass.
    after_change: print after a pass only if it changed the IR; given alone (no `after`,
        no `after_all`) it prints after every pass that changed the IR.
    tree_dir: write files instead of printing to `stream`.  The layout is
        `tree_dir/<function>/NN_<pass>_before.ftir` and `NN_<pass>_after.ftir`: one folder
        per `func.func` (named after its symbol; `module` when there is none), each file a
        complete module holding only that function, NN the pass's position in the pipeline
        (01, 02, ...; wider when the pipeline has 100 passes or more), so the files of a
        folder sort in pipeline order.
    stream: where printed IR goes; None means sys.stderr at the time of printing.
    print_locations: print each op's `loc(...)`.

    Printed IR is preceded by mlir-opt's header, `// -----// IR Dump After cse //----- //`.
    """

    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()
    after_all: bool = False
    after_change: bool = False
    tree_dir: str | None = None
    stream: TextIO | None = None
    print_locations: bool = False

    def prints_before(self, pass_name: str) -> bool:
        return pass_name in self.before

    def prints_after(self, pass_name: str, changed: bool) -> bool:
        chosen = self.after_all or pass_name in self.after or (self.after_change and not self.after)
        return chosen and (changed or not self.after_change)


@dataclass
class PipelineResult:
    """What a pipeline run did.

    pass_times: wall seconds per pass name, summed over its runs, in order of first run.
    changed: the name of each pass run that changed the IR, in run order.
    overhead_times: with `PassManager(timing=True)`, seconds the manager itself spent
        (verify, print-ir, clone, after-pass hook, reproducer snapshot).
    """

    pass_times: dict[str, float] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    overhead_times: dict[str, float] = field(default_factory=dict)

    def timing_report(self) -> str:
        """A table in the style of mlir-opt's -mlir-timing."""
        rows = list(self.pass_times.items()) + [(f"({name})", t) for name, t in self.overhead_times.items()]
        total = sum(t for _, t in rows)
        rule = "===" + "-" * 73 + "==="
        lines = [rule, "... Execution time report ...".center(79).rstrip(), rule,
                 f"  Total Execution Time: {total:.4f} seconds", "", "  ----Wall Time----  ----Name----"]
        lines += [f"  {t:8.4f} ({_percent(t, total):5.1f}%)  {name}" for name, t in rows]
        lines.append(f"  {total:8.4f} (100.0%)  Total")
        return "\n".join(lines) + "\n"


def _percent(part: float, total: float) -> float:
    return 100.0 * part / total if total > 0 else 0.0


class PassManager:
    """Runs a pipeline (text, or Pass objects) over modules; see the module docstring."""

    def __init__(
        self,
        pipeline: str | list[Pass],
        *,
        verify_each: bool = True,
        printing: IRPrinting | None = None,
        timing: bool = False,
        reproducer_dir: str | None = None,
        after_pass: AfterPass | None = None,
    ):
        self.passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        for entry in self.passes:
            if not isinstance(entry, Pass):
                raise TypeError(f"a pipeline holds Pass objects, not {type(entry).__name__} ({entry!r})")
        if printing is not None:
            _check_pass_names(printing)
        self.verify_each = verify_each
        self.printing = printing
        self.timing = timing
        self.reproducer_dir = reproducer_dir
        self.after_pass = after_pass

    def run(self, module: Module) -> PipelineResult:
        """Run every pass over `module` in place.

        Raises PassError naming the pass when one raises, or (with verify_each) leaves
        invalid IR; the IR it received is saved to a reproducer file named in the message.
        With verify_each, an invalid input module raises VerificationError before any pass.
        """
        result = PipelineResult()
        if self.verify_each:
            with self._overhead(result, "verify"):
                verify(module)
        received = self._snapshot(module, None, result)
        for position, pass_ in enumerate(self.passes, start=1):
            received = self._run_pass(position, pass_, module, received, result)
        return result

    def _run_pass(self, position: int, pass_: Pass, module: Module, received: str, result: PipelineResult) -> str:
        """Run one pass; returns the text of the IR it produced."""
        before = None
        if self.after_pass is not None:
            with self._overhead(result, "clone"):
                before = clone_module(module)
        if self.printing is not None and self.printing.prints_before(pass_.name):
            self._print(module, position, pass_, "Before", result)
        start = time.perf_counter()
        try:
            returned = pass_.run(module)
        except Exception as error:
            raise self._failure(pass_, received, f"failed: {type(error).__name__}: {error}") from error
        result.pass_times[pass_.name] = result.pass_times.get(pass_.name, 0.0) + time.perf_counter() - start
        if not isinstance(returned, bool):
            raise PassError(f"pass '{pass_.name}': run() returned {returned!r}; it must return True if it "
                            f"changed the IR and False if not")
        if self.verify_each:
            with self._overhead(result, "verify"):
                self._verify(pass_, module, received)
        produced = self._snapshot(module, pass_, result)
        changed = produced != received
        if changed:
            result.changed.append(pass_.name)
        if self.printing is not None and self.printing.prints_after(pass_.name, changed):
            self._print(module, position, pass_, "After", result)
        if before is not None:
            with self._overhead(result, "after-pass hook"):
                self.after_pass(pass_.name, before, module)
        return produced

    def _snapshot(self, module: Module, producer: Pass | None, result: PipelineResult) -> str:
        """The module's text, kept so a crashing pass's input can be written out.

        Printing fails only on malformed IR, which (without verify_each) the previous
        pass left behind.
        """
        with self._overhead(result, "reproducer snapshot"):
            try:
                return print_module(module, print_locations=True)
            except ValueError as e:
                culprit = f"after pass '{producer.name}'" if producer else "given to the pass manager"
                raise PassError(f"the IR {culprit} is malformed: {e}; run with verify_each=True "
                                f"(flagtree-opt --verify-each) to find the pass that broke it") from e

    def _verify(self, pass_: Pass, module: Module, received: str) -> None:
        try:
            verify(module)
        except VerificationError as e:
            raise self._failure(pass_, received, f"produced invalid IR: {e}", replay_flags=" --verify-each") from e

    def _failure(self, pass_: Pass, received: str, what: str, replay_flags: str = "") -> PassError:
        """A PassError saying `what` happened, with a reproducer of the IR `pass_` received."""
        spec = pass_.pipeline_text()
        directory = Path(self.reproducer_dir or tempfile.gettempdir())
        path = _new_reproducer_path(directory, pass_.name)
        command = f"flagtree-opt {shlex.quote(str(path))} -p {_single_quoted(spec)}{replay_flags}"
        what = " ".join(what.split())
        path.write_text(f"// Pass '{pass_.name}' {what}\n// Replay: {command}\n{received}")
        return PassError(f"pass '{pass_.name}' {what}; the IR it received is in {path}; replay with: {command}")

    def _print(self, module: Module, position: int, pass_: Pass, when: str, result: PipelineResult) -> None:
        with self._overhead(result, "print-ir"):
            printing = self.printing
            header = f"// -----// IR Dump {when} {pass_.name} //----- //\n"
            if printing.tree_dir is None:
                stream = printing.stream or sys.stderr
                stream.write(header + print_module(module, printing.print_locations) + "\n")
                stream.flush()
                return
            width = max(2, len(str(len(self.passes))))
            file_name = f"{position:0{width}d}_{pass_.name}_{when.lower()}.ftir"
            for folder, text in _module_texts_by_function(module, printing.print_locations):
                path = Path(printing.tree_dir) / folder / file_name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(header + text)

    @contextmanager
    def _overhead(self, result: PipelineResult, what: str):
        if not self.timing:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            result.overhead_times[what] = result.overhead_times.get(what, 0.0) + time.perf_counter() - start


def _check_pass_names(printing: IRPrinting) -> None:
    unknown = sorted((printing.before | printing.after) - set(all_passes()))
    if unknown:
        raise OptionsError(f"IR printing names unknown pass(es) {', '.join(map(repr, unknown))}; "
                           f"valid passes: {', '.join(all_passes())}")


def _single_quoted(text: str) -> str:
    """`text` in single quotes for a POSIX shell (always quoted, so `{...}` stays literal)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _new_reproducer_path(directory: Path, pass_name: str) -> Path:
    """Create an empty `flagtree_repro_<pass>_<n>.ftir` with the first free n; creating it
    exclusively keeps concurrent failures from overwriting each other's reproducers."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = directory / f"flagtree_repro_{pass_name}_{n}.ftir"
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            n += 1


def _module_texts_by_function(module: Module, print_locations: bool) -> list[tuple[str, str]]:
    """(folder name, text of a module holding only that function) for each function."""
    functions = module.functions
    if not functions:
        return [("module", print_module(module, print_locations))]
    return [(_folder_name(f), _single_function_module(f, print_locations)) for f in functions]


def _folder_name(func: Operation) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", func.attributes["sym_name"]) or "_"


def _single_function_module(func: Operation, print_locations: bool) -> str:
    """What print_module prints for a module whose only op is `func`."""
    body = "\n".join("  " + line for line in print_op(func, print_locations).splitlines())
    return f'"builtin.module"() ({{\n{body}\n}}) : () -> ()\n'
