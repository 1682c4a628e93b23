"""Run the lit + FileCheck regression suite (tests/lit) as part of pytest, so one
command runs both."""

import shutil
import subprocess
import sys
from pathlib import Path

LIT_DIR = Path(__file__).parent / "lit"


def test_lit_suite():
    lit = shutil.which("lit") or str(Path(sys.executable).parent / "lit")
    proc = subprocess.run([lit, "-sv", str(LIT_DIR)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert "Passed" in proc.stdout, proc.stdout[-2000:]
