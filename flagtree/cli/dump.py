"""`flagtree dump`: run a script with FLAGTREE_DUMP_DIR set and summarize what it wrote.

The frontend writes one folder per compiled graph (FX graph, FTIR before/after each pass,
report.json); this module runs the script and reads those reports back.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flagtree.errors import FlagtreeError
from flagtree.reports import Report

DUMP_DIR_ENV = "FLAGTREE_DUMP_DIR"
DEFAULT_DUMP_DIR = "flagtree_dump"
REPORT_FILE = "report.json"


@contextmanager
def _script_environment(script: Path, script_args: Sequence[str], dump_dir: Path) -> Iterator[None]:
    """sys.argv, sys.path[0] and FLAGTREE_DUMP_DIR as `python SCRIPT ARGS` would see them, restored after."""
    saved_argv, saved_path, saved_env = sys.argv, list(sys.path), os.environ.get(DUMP_DIR_ENV)
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    os.environ[DUMP_DIR_ENV] = str(dump_dir)
    try:
        yield
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_env is None:
            os.environ.pop(DUMP_DIR_ENV, None)
        else:
            os.environ[DUMP_DIR_ENV] = saved_env


def run_script(script: Path, script_args: Sequence[str], dump_dir: Path) -> int:
    """Run `script` as `__main__` with dumping on; returns its exit status.

    An exception in the script is the script's own failure: its traceback is printed, as
    `python SCRIPT` would, and the status is 1.
    """
    if not script.is_file():
        raise FlagtreeError(f"{script}: no such script")
    with _script_environment(script, script_args, dump_dir):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            return _exit_status(e.code)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def report_stamps(dump_dir: Path) -> dict[Path, int]:
    """Each report under `dump_dir` with its modification time, to tell this run's graphs apart."""
    return {p: p.stat().st_mtime_ns for p in dump_dir.rglob(REPORT_FILE)} if dump_dir.is_dir() else {}


def written_graphs(dump_dir: Path, stamps_before: dict[Path, int]) -> list[Path]:
    """The graph folders whose report appeared or changed since `stamps_before` was taken,
    in the order they were written."""
    now = report_stamps(dump_dir)
    return [p.parent for p, stamp in sorted(now.items(), key=lambda item: item[1]) if stamps_before.get(p) != stamp]


def summarize(dump_dir: Path, graphs: list[Path]) -> str:
    """A human summary: each graph folder, what is in it, and its report."""
    if not graphs:
        return (f"no graph was dumped under {dump_dir}/: the script compiled nothing with "
                f"torch.compile(..., backend=\"flagtree\")")
    lines = [f"{len(graphs)} graph{'s' if len(graphs) != 1 else ''} dumped under {dump_dir}/:"]
    for folder in graphs:
        report = Report(**json.loads((folder / REPORT_FILE).read_text()))
        lines.append(f"  {folder.relative_to(dump_dir).as_posix()}/: {describe_contents(folder)}")
        lines.append(f"    {report.summary()}")
        lines.append(f"    pass times: {_pass_times(report.pass_times)}")
    return "\n".join(lines)


def describe_contents(folder: Path) -> str:
    """`fx_graph.py, input.ftir, passes/ (10 files), ...`: files, and folders by file count."""
    entries = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            entries.append(f"{entry.name}/ ({sum(1 for p in entry.rglob('*') if p.is_file())} files)")
        else:
            entries.append(entry.name)
    return ", ".join(entries)


def _pass_times(times: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in times.items()) or "no passes ran"
