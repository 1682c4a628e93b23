"""`flagtree`: the umbrella command (dump, backends, opt)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flagtree.backends.registry import all_backends
from flagtree.cli import dump, opt
from flagtree.cli._errors import OneLineArgumentParser, run_reporting_errors
from flagtree.errors import OptionsError


def build_parser() -> argparse.ArgumentParser:
    """The parser of `flagtree` and its subcommands (`opt` is dispatched to flagtree-opt's own)."""
    parser = OneLineArgumentParser(
        prog="flagtree",
        description="flagtree's command-line tools. Run `flagtree COMMAND --help` for each command's flags.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks for flagtree's own errors instead of one-line messages "
                             "(default: off)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineArgumentParser)

    dump_parser = commands.add_parser(
        "dump", help="run a script and write every stage of each flagtree compile to files",
        description="Run SCRIPT (as `python SCRIPT ARGS` would) with FLAGTREE_DUMP_DIR set, so every "
                    "torch.compile(..., backend=\"flagtree\") in it writes one folder per graph (FX graph, "
                    "input FTIR, FTIR before/after each pass, output FTIR, the launch plan plan.py, the generated "
                    "kernels kernels.mlir or kernels.triton, report.json); then print a summary "
                    "of the folders and of each graph's report (backend, fusions, fallbacks, pass times). "
                    "Exits with the script's exit status.",
        epilog="Example: flagtree dump train.py --dump-dir dump -- --steps 1",
    )
    dump_parser.add_argument("script", metavar="SCRIPT.py", type=Path, help="the Python script to run")
    dump_parser.add_argument("script_args", nargs="*", metavar="ARGS",
                             help="arguments for the script (sys.argv[1:]); put them after `--` when one starts "
                                  "with '-'")
    dump_parser.add_argument("--dump-dir", type=Path, default=Path(dump.DEFAULT_DUMP_DIR), metavar="DIR",
                             help=f"where the graph folders go (default: ./{dump.DEFAULT_DUMP_DIR})")

    commands.add_parser(
        "backends", help="list the backends and whether each is available here",
        description="List every backend flagtree knows: its name, whether it is available on this machine, "
                    "and why (or why not).",
    )
    commands.add_parser(
        "opt", add_help=False, help="same as flagtree-opt: parse FTIR, run passes, print (flagtree opt --help)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `flagtree`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["opt"]:
        return opt.main(argv[1:], prog="flagtree opt")
    own, after_dashes = _split_at_double_dash(argv)
    args = build_parser().parse_args(own)
    return run_reporting_errors("flagtree", args.debug, lambda: run(args, after_dashes))


def _split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    # argparse (3.11) rejects `--` after a positional with nargs="*", so the script's own
    # arguments are cut off before parsing.
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def run(args: argparse.Namespace, after_dashes: list[str]) -> int:
    """Run the parsed subcommand (`opt` never gets here: `main` hands it to flagtree-opt)."""
    if args.command != "dump" and after_dashes:
        raise OptionsError(f"arguments after `--` are only for `flagtree dump`, not `flagtree {args.command}`")
    if args.command == "dump":
        return run_dump(args.script, [*args.script_args, *after_dashes], args.dump_dir)
    return list_backends()


def run_dump(script: Path, script_args: list[str], dump_dir: Path) -> int:
    """`flagtree dump`: run the script with dumping on, then summarize this run's graphs."""
    stamps = dump.report_stamps(dump_dir)
    status = dump.run_script(script, script_args, dump_dir)
    print(dump.summarize(dump_dir, dump.written_graphs(dump_dir, stamps)))
    if status:
        print(f"flagtree dump: {script} exited with status {status}", file=sys.stderr)
    return status


def list_backends() -> int:
    """`flagtree backends`: each registered backend, whether it runs here (and why not), and
    its capabilities on this machine."""
    backends = all_backends()
    width = max(len("backend"), *(len(name) for name in backends))
    print(f"{'backend':<{width}}  priority  available  details")
    for name, backend in backends.items():
        availability = backend.availability()
        details = backend.capabilities().describe() if availability.ok else availability.reason
        print(f"{name:<{width}}  {backend.priority:>8}  {'yes' if availability.ok else 'no':<9}  {details}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
