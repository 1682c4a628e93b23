"""The on-disk kernel cache: keys, damaged entries, warm processes, concurrent writers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flagtree.backends.base import Capabilities
from flagtree.runtime import DiskCache, cache_dir, cache_key, cache_stats

CAPS = Capabilities(target="gpu", dtypes=frozenset({"f32", "bf16", "f16", "i64", "i1"}), warp_size=32)
KEY_PARTS = {"unit": "%0 = ft.exp", "backend": "interpret", "capabilities": CAPS, "options": {"a": 1},
             "versions": {"torch": "2.11"}}


pytestmark = pytest.mark.usefixtures("fresh_cache")  # each test: an empty cache, zeroed counters


def _run(script: str, env: dict[str, str]) -> dict:
    """Run `script` in a fresh Python process; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- keys ------------------------------------------------------------------------------


def test_the_key_changes_with_every_part():
    base = cache_key(**KEY_PARTS)
    variants = [{"unit": "%0 = ft.log"}, {"backend": "cuda"}, {"capabilities": Capabilities("gpu", frozenset())},
                {"options": {"a": 2}}, {"versions": {"torch": "2.12"}}]
    keys = {cache_key(**{**KEY_PARTS, **variant}) for variant in variants}
    assert base not in keys and len(keys) == len(variants)
    assert cache_key(**KEY_PARTS) == base


def test_the_key_is_the_same_in_every_process():
    """Capabilities hold frozensets, whose order depends on the string hash seed."""
    script = """
        import json
        from flagtree.backends.base import Capabilities
        from flagtree.runtime import cache_key
        caps = Capabilities(target="gpu", dtypes=frozenset({"f32", "bf16", "f16", "i64", "i1"}), warp_size=32)
        print(json.dumps(cache_key("%0 = ft.exp", "interpret", caps, {"a": 1}, {"torch": "2.11"})))
    """
    keys = {_run(script, {"PYTHONHASHSEED": seed}) for seed in ("1", "2", "3")}
    assert keys == {cache_key(**KEY_PARTS)}


def test_the_cache_lives_under_the_documented_directory(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("FLAGTREE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "flagtree"


# --- entries -----------------------------------------------------------------------------


def test_entries_round_trip_and_count_hits_and_misses():
    cache = DiskCache("test")
    key = cache_key(**KEY_PARTS)
    built = []
    for _ in range(3):
        path, payload = cache.get_or_build(key, lambda: built.append(1) or "payload ü\n", suffix=".py")
    assert payload == "payload ü\n" and len(built) == 1
    assert path == cache.root / key[:2] / f"{key}.py"
    assert path.read_text().startswith("# flagtree-cache v1 length=")
    stats = cache_stats()
    assert (stats.hits, stats.misses, stats.rebuilds) == (2, 1, 0)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "drop the header", "empty"])
def test_a_damaged_entry_is_reported_once_and_rebuilt(damage, caplog):
    cache = DiskCache("test")
    key = cache_key(**KEY_PARTS)
    path = cache.store(key, "x = 1\n" * 50)
    raw = path.read_bytes()
    damaged = {"truncate": raw[:-7], "flip a byte": raw[:-3] + b"Y" + raw[-2:],
               "drop the header": raw.split(b"\n", 1)[1], "empty": b""}[damage]
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="flagtree"):
        assert cache.load(key) is None
        assert cache.load(key) is None
    assert caplog.text.count("is damaged") == 1 and str(path) in caplog.text
    assert cache.get_or_build(key, lambda: "x = 1\n" * 50)[1] == "x = 1\n" * 50
    assert cache.load(key) == "x = 1\n" * 50
    assert cache_stats().rebuilds == 3


# --- generated kernels across processes -----------------------------------------------------

_COMPILE_AND_RUN = """
    import json, sys
    import torch
    from flagtree.backends.interpret import InterpretBackend
    from flagtree.backends.reference import run_module
    from flagtree.ir import parse_module
    from flagtree.runtime import cache_stats
    module = parse_module(open(sys.argv[1]).read() if len(sys.argv) > 1 else MODULE, "m.ftir")
    backend = InterpretBackend()
    plan, kernels = backend.compile_with_kernels(module, backend.capabilities())
    x = torch.randn(5, 33)
    correct = all(torch.allclose(a, e, atol=1e-5, equal_nan=True)
                  for a, e in zip(plan(x), run_module(module, [x])))
    stats = cache_stats()
    print(json.dumps({"hits": stats.hits, "misses": stats.misses, "rebuilds": stats.rebuilds,
                      "correct": correct, "files": sorted(str(k.path) for k in kernels)}))
"""

MODULE = """
"builtin.module"() ({
  "func.func"() <{function_type = (tensor<?x33xf32>) -> (tensor<?x33xf32>, tensor<?x33xf32>), sym_name = "main"}> ({
  ^bb0(%arg0: tensor<?x33xf32>):
    %0 = "ft.fusion"(%arg0) ({
    ^bb0(%a: tensor<?x33xf32>):
      %1 = "ft.exp"(%a) : (tensor<?x33xf32>) -> tensor<?x33xf32>
      "ft.yield"(%1) : (tensor<?x33xf32>) -> ()
    }) {kind = "elementwise"} : (tensor<?x33xf32>) -> tensor<?x33xf32>
    %2 = "ft.fusion"(%0) ({
    ^bb0(%b: tensor<?x33xf32>):
      %3 = "ft.softmax"(%b) {dim = 1 : i64} : (tensor<?x33xf32>) -> tensor<?x33xf32>
      "ft.yield"(%3) : (tensor<?x33xf32>) -> ()
    }) {kind = "reduction"} : (tensor<?x33xf32>) -> tensor<?x33xf32>
    "func.return"(%0, %2) : (tensor<?x33xf32>, tensor<?x33xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"""


def _compile_in_a_new_process() -> dict:
    return _run(f"MODULE = {MODULE!r}\n" + textwrap.dedent(_COMPILE_AND_RUN), {})


def test_a_warm_process_generates_nothing():
    cold = _compile_in_a_new_process()
    assert (cold["misses"], cold["hits"]) == (2, 0) and cold["correct"]
    written = {f: Path(f).stat().st_mtime_ns for f in cold["files"]}
    warm = _compile_in_a_new_process()
    assert (warm["misses"], warm["hits"], warm["rebuilds"]) == (0, 2, 0) and warm["correct"]
    assert {f: Path(f).stat().st_mtime_ns for f in warm["files"]} == written


def test_a_truncated_kernel_is_rebuilt_by_the_next_process():
    cold = _compile_in_a_new_process()
    damaged = Path(cold["files"][0])
    damaged.write_bytes(damaged.read_bytes()[:200])
    repaired = _compile_in_a_new_process()
    assert (repaired["rebuilds"], repaired["misses"], repaired["hits"]) == (1, 1, 1) and repaired["correct"]
    assert DiskCache("triton").load(damaged.stem, ".py") is not None


def _build_slowly(root: str, key: str, barrier, results) -> None:
    barrier.wait()
    path, payload = DiskCache("race", Path(root)).get_or_build(key, lambda: time.sleep(0.2) or "same bytes\n" * 1000)
    results.put((str(path), payload == "same bytes\n" * 1000))


def test_concurrent_writers_of_one_entry_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    key = cache_key(**KEY_PARTS)
    workers = [context.Process(target=_build_slowly, args=(str(tmp_path), key, barrier, results)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    outcomes = [results.get(timeout=5) for _ in workers]
    assert all(ok for _, ok in outcomes) and len({path for path, _ in outcomes}) == 1
    assert DiskCache("race", tmp_path).load(key) == "same bytes\n" * 1000
    assert not list((tmp_path / "race").rglob("*.tmp"))


def test_two_processes_compiling_the_same_graph_both_succeed():
    script = f"MODULE = {MODULE!r}\n" + textwrap.dedent(_COMPILE_AND_RUN)
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    reports = []
    for p in processes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["correct"] for r in reports)
    assert reports[0]["files"] == reports[1]["files"]
    assert all(DiskCache("triton").load(Path(f).stem, ".py") is not None for f in reports[0]["files"])
