"""`flagtree-opt`: read FTIR, run a pass pipeline on it, print the result.

The flags follow `mlir-opt` so compiler engineers feel at home. The module is parsed and
verified first; with no pipeline it is printed back unchanged. Errors are one line on
stderr naming the file position or the pass (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from flagtree.backends.base import Backend
from flagtree.backends.registry import get_backend, select_backend
from flagtree.cli._errors import OneLineArgumentParser, run_reporting_errors
from flagtree.cli.semantics import SemanticChecker
from flagtree.errors import OptionsError
from flagtree.ir import Module, parse_module, print_module, verify
from flagtree.passes import IRPrinting, PassManager, all_passes, parse_pipeline, preset_pipeline
from flagtree.passes.base import format_option_value

EMIT_FORMATS = ("ftir", "mlir", "triton", "python")
# Fusion passes are named fuse-<what> (fuse-attention, fuse-moe, ...).
FUSION_PASS_PREFIX = "fuse-"
# The bool option a pass that can say why it did or did not fire takes (--explain sets it).
EXPLAIN_OPTION = "explain"
# Flags that only act on passes: with no pipeline they would do nothing, so say so.
_PIPELINE_FLAGS = ("print_ir_before", "print_ir_after", "print_ir_after_all", "print_ir_after_change",
                   "print_ir_tree_dir", "timing", "check_semantics")


def build_parser(prog: str = "flagtree-opt") -> argparse.ArgumentParser:
    """The argument parser of flagtree-opt (also used by `flagtree opt`)."""
    parser = OneLineArgumentParser(
        prog=prog,
        description="Read an FTIR module (MLIR generic form), verify it, run a pass pipeline on it and print "
                    "the result. With no pipeline the verified module is printed unchanged.",
        epilog="Example: %(prog)s in.ftir -p canonicalize,cse --print-ir-after-all --check-semantics. "
               "Exit status: 0 on success, 1 for bad input or a failing pass, 2 for bad usage, "
               "70 for a crash inside flagtree itself (a bug).",
    )
    parser.add_argument("file", nargs="?", metavar="FILE",
                        help="the FTIR file to read; '-' reads standard input")
    parser.add_argument("-p", "--pass-pipeline", dest="pipeline", default="", metavar="PIPELINE",
                        help="passes to run, comma-separated, with options in braces "
                             "(e.g. 'canonicalize{max-iterations=3},cse'), or a preset O0..O3; "
                             "default: none (only parse, verify and print)")
    parser.add_argument("--list-passes", action="store_true",
                        help="print every registered pass with its options and the presets, then exit")

    printing = parser.add_argument_group("IR printing (to stderr, so stdout stays the result)")
    printing.add_argument("--print-ir-before", action="append", default=[], metavar="PASS[,PASS]",
                          help="print the IR before each run of the named passes; repeatable; default: none")
    printing.add_argument("--print-ir-after", action="append", default=[], metavar="PASS[,PASS]",
                          help="print the IR after each run of the named passes; repeatable; default: none")
    printing.add_argument("--print-ir-after-all", action="store_true",
                          help="print the IR after every pass (default: off)")
    printing.add_argument("--print-ir-after-change", action="store_true",
                          help="print the IR after a pass only if the pass changed it; combines with the "
                               "--print-ir-after* flags to skip passes that changed nothing (default: off)")
    printing.add_argument("--print-ir-tree-dir", metavar="DIR",
                          help="write the printed IR into files under DIR (one per pass, numbered in pipeline "
                               "order) instead of stderr; default: stderr")
    printing.add_argument("--print-debuginfo", action="store_true",
                          help="print op locations (loc(...)) in the output and in printed IR (default: off)")

    checking = parser.add_argument_group("checking")
    checking.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True,
                          help="run the FTIR verifier after every pass; the input is always verified "
                               "(default: on)")
    checking.add_argument("--check-semantics", action="store_true",
                          help="run the IR before and after every pass on the same random inputs with the "
                               "reference backend and fail naming the first pass that changes a result "
                               "(relative L2 tolerance f32 1e-5, f16 2e-3, bf16 1.6e-2; exact for integers "
                               "and bools; NaNs must stay where they are) (default: off)")
    checking.add_argument("--seed", type=int, metavar="N",
                          help="seed of the --check-semantics random inputs; default: a fresh seed each run, "
                               "printed in any failure so it can be replayed")
    checking.add_argument("--timing", action="store_true",
                          help="print the time each pass took, to stderr (default: off)")
    checking.add_argument("--explain", action="store_true",
                          help="run every pass that has an 'explain' option with explain=true: fuse-attention "
                               "prints one line per candidate softmax to stderr (file:line: fused, or the "
                               "constraint that failed); a fusion pass without the option is named in a note "
                               "(default: off)")

    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", default="-", metavar="OUT",
                        help="write the result to OUT; default: '-' (standard output)")
    output.add_argument("--emit", choices=EMIT_FORMATS, default="ftir",
                        help="what to print: ftir (the module after the pipeline), or an artifact of the "
                             "target backend: mlir (cpu), triton (cuda, rocm, interpret), python (the launch "
                             "plan of any codegen backend) (default: ftir)")
    output.add_argument("--target", metavar="NAME",
                        help="lower for this backend: its lowering passes run after -p, and --emit prints its "
                             "artifacts; `flagtree backends` lists the names (default: none for --emit=ftir, "
                             "else the default backend for CPU tensors)")
    output.add_argument("--crash-reproducer-dir", metavar="DIR",
                        help="where the IR a crashing pass received is saved for replay (the error names the "
                             "file and the command); default: the system's temporary directory")
    output.add_argument("--debug", action="store_true",
                        help="show Python tracebacks for errors instead of one-line messages (default: off)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "flagtree-opt") -> int:
    """Entry point of `flagtree-opt`; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    return run_reporting_errors(prog, args.debug, lambda: run(args, prog))


def run(args: argparse.Namespace, prog: str) -> int:
    """Do what the parsed command line asks; raises FlagtreeError / OSError for bad input."""
    check_output_options(args)
    if args.list_passes:
        print(describe_passes())
        return 0
    if args.file is None:
        raise OptionsError("no input file: give an FTIR file, or '-' to read standard input")
    module = read_module(args.file)
    backend = target_backend(args)
    capabilities = backend.capabilities() if backend is not None else None
    pipeline = ",".join(p for p in (args.pipeline, backend.pipeline(capabilities) if backend else "") if p)
    if args.explain:
        pipeline, notes = explain(pipeline)
        for note in notes:
            print(f"{prog}: note: {note}", file=sys.stderr)
    if pipeline:
        run_pipeline(module, pipeline, args, prog)
    else:
        warn_unused_pipeline_flags(args, prog)
    if args.emit == "ftir":
        text = print_module(module, print_locations=args.print_debuginfo)
    else:
        text = emit_artifact(backend, module, capabilities, args.emit)
    write_output(text, args.output)
    return 0


def check_output_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, a --target this machine cannot use (unknown or unavailable)."""
    if args.target is not None:
        get_backend(args.target)


def target_backend(args: argparse.Namespace) -> Backend | None:
    """The backend to lower for: --target, else the CPU default when an artifact is asked for."""
    if args.target is not None:
        return get_backend(args.target)
    if args.emit != "ftir":
        import torch

        return select_backend(torch.device("cpu"))
    return None


def emit_artifact(backend: Backend, module: Module, capabilities: object, form: str) -> str:
    """The backend's `form` artifact for `module`; a form it cannot emit is an OptionsError naming those it can."""
    if form not in backend.emit_forms():
        raise OptionsError(f"--emit={form}: backend '{backend.name}' emits "
                           f"{', '.join(backend.emit_forms()) or 'no artifacts'}; pick another --target")
    return backend.emit(module, capabilities, form)


def read_module(path: str) -> Module:
    """Parse and verify FTIR from `path` ('-': stdin); errors name file:line:col or the op."""
    if path == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        text, name = Path(path).read_text(), path
    module = parse_module(text, name)
    verify(module)
    return module


def run_pipeline(module: Module, pipeline: str, args: argparse.Namespace, prog: str) -> None:
    """Run `pipeline` on `module` in place, with the printing and checks the flags ask for."""
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    checker = SemanticChecker(module, seed) if args.check_semantics else None
    manager = PassManager(pipeline, verify_each=args.verify_each, printing=ir_printing(args),
                          timing=args.timing, reproducer_dir=args.crash_reproducer_dir, after_pass=checker)
    result = manager.run(module)
    if args.timing:
        sys.stderr.write(result.timing_report())
    if checker is not None:
        print(f"{prog}: note: --check-semantics: {checker.passes_checked} pass runs keep every result on random "
              f"inputs (seed {checker.seed})", file=sys.stderr)


def ir_printing(args: argparse.Namespace) -> IRPrinting | None:
    """The pass manager's IRPrinting for the --print-ir-* flags, or None when none is given."""
    before, after = _pass_names(args.print_ir_before), _pass_names(args.print_ir_after)
    if not (before or after or args.print_ir_after_all or args.print_ir_after_change):
        if args.print_ir_tree_dir is not None:
            raise OptionsError("--print-ir-tree-dir needs --print-ir-before, --print-ir-after, --print-ir-after-all "
                               "or --print-ir-after-change to choose which IR to write")
        return None
    return IRPrinting(before=before, after=after, after_all=args.print_ir_after_all,
                      after_change=args.print_ir_after_change, tree_dir=args.print_ir_tree_dir,
                      stream=sys.stderr, print_locations=args.print_debuginfo)


def _pass_names(values: list[str]) -> frozenset[str]:
    """`['a,b', 'c']` → {'a', 'b', 'c'} (the pass manager rejects names no pass has)."""
    return frozenset(n.strip() for value in values for n in value.split(",") if n.strip())


def warn_unused_pipeline_flags(args: argparse.Namespace, prog: str) -> None:
    used = [f"--{flag.replace('_', '-')}" for flag in _PIPELINE_FLAGS if getattr(args, flag)]
    if used:
        print(f"{prog}: note: {', '.join(used)} did nothing: no pipeline was given (-p)", file=sys.stderr)


def explain(pipeline: str) -> tuple[str, list[str]]:
    """`pipeline` with explain=true on every pass that has an `explain` option, and the
    notes --explain prints: the fusion passes that cannot explain, or that there is nothing
    to explain."""
    passes = parse_pipeline(pipeline)
    explaining = [p.name for p in passes if EXPLAIN_OPTION in p.options()]
    silent = sorted({p.name for p in passes if p.name.startswith(FUSION_PASS_PREFIX)} - set(explaining))
    notes = []
    if silent:
        notes.append(f"--explain: {', '.join(silent)} cannot report why a pattern did not fuse")
    if not explaining and not silent:
        shown = f"'{pipeline}'" if pipeline else "(none given)"
        notes.append(f"--explain: no fusion pass in pipeline {shown}: nothing to explain")
    explained = [dataclasses.replace(p, explain=True) if p.name in explaining else p for p in passes]
    return ",".join(p.pipeline_text() for p in explained), notes


def describe_passes() -> str:
    """Every registered pass with its options, and the presets, as --list-passes prints them."""
    lines = ["passes (-p NAME or NAME{option=value ...}):"]
    for pass_class in all_passes().values():
        lines.append(f"  {pass_class.describe()}")
        lines.extend(f"      {spec.text_name}: {spec.describe_type()} (default {format_option_value(spec.default)})"
                     for spec in pass_class.options().values())
    lines.append("presets (-p O2, or inside a pipeline: O1,cse):")
    lines.extend(f"  O{level}: {preset_pipeline(level) or '(no passes)'}" for level in range(4))
    return "\n".join(lines)


def write_output(text: str, destination: str) -> None:
    if destination == "-":
        sys.stdout.write(text)
    else:
        Path(destination).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
