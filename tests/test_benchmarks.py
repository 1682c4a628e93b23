"""The attention benchmarks' --quick modes (tiny shapes on the interpret backend): they run,
check flagtree against fp64 (a result outside tolerance exits 1) and write their JSON, so a GPU
session does not find them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("script", "results"), [("attention.py", "results"), ("attention_backward.py", "methods")])
def test_quick_mode_checks_and_times_flagtree(script, results, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT), "FLAGTREE_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / script.replace(".py", ".json")).read_text())
    assert report["cases"]
    for case in report["cases"]:
        kernel = case[results]["flagtree kernel"]
        assert kernel["ms"] > 0 and kernel["rel_l2_vs_fp64"] < 1.6e-2, case
