"""How the command-line tools report failures: one line on stderr, a traceback only with --debug."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from flagtree.errors import FlagtreeError, SourceError

# Exit status for a crash inside flagtree itself (a bug), as opposed to bad input (1)
# or bad command-line usage (2, argparse's convention); 70 is sysexits' EX_SOFTWARE.
EXIT_INTERNAL_ERROR = 70


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line that points at --help."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def describe(error: BaseException) -> str:
    """The user-facing text of an error, without the `error:` tag SourceError adds."""
    if isinstance(error, SourceError):
        return f"{error.file}:{error.line}:{error.col}: {error.message}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def one_line(text: str) -> str:
    """Join a multi-line message so the whole of it stays on one stderr line."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def run_reporting_errors(prog: str, debug: bool, action: Callable[[], int]) -> int:
    """Run `action`; turn errors into one stderr line and an exit status, unless `debug`."""
    try:
        return action()
    except (FlagtreeError, OSError) as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(describe(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(str(e))} "
              f"(this is a bug in flagtree; rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
