"""The pass manager: IR printing, the IR tree dump, verify_each, crash reproducers, timing,
and the after_pass hook."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from flagtree.errors import OptionsError, PassError, VerificationError
from flagtree.ir import Module, parse_module, print_module
from flagtree.ir.types import parse_type
from flagtree.passes import IRPrinting, Pass, PassManager, get_pass, parse_pipeline, register_pass
from flagtree.passes import base as pass_base
from flagtree.passes import manager as pass_manager

# canonicalize drops `x * 1`; cse and dce find nothing to do.
FUNCTION = """
  "func.func"() <{{function_type = (tensor<4xf32>) -> tensor<4xf32>, sym_name = "{name}"}}> ({{
  ^bb0(%arg0: tensor<4xf32>):
    %0 = "ft.constant"() {{value = dense<1.0> : tensor<4xf32>}} : () -> tensor<4xf32>
    %1 = "ft.mul"(%arg0, %0) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    %2 = "ft.exp"(%1) : (tensor<4xf32>) -> tensor<4xf32>
    "func.return"(%2) : (tensor<4xf32>) -> ()
  }}) : () -> ()"""


def make_module(*functions: str) -> Module:
    body = "".join(FUNCTION.format(name=name) for name in functions or ("main",))
    return parse_module(f'"builtin.module"() ({{{body}\n}}) : () -> ()\n')


def headers(text: str) -> list[str]:
    return re.findall(r"^// -----// IR Dump (\w+ [\w-]+) //----- //$", text, re.MULTILINE)


@dataclass(frozen=True)
class BreakIR(Pass):
    """Retypes the first ft.exp's result: the IR no longer verifies."""

    name: ClassVar[str] = "test-break-ir"

    def run(self, module: Module) -> bool:
        op = next(op for op in module.walk() if op.name == "ft.exp")
        op.results[0].type = parse_type("tensor<5xf32>")
        return True


@dataclass(frozen=True)
class Crash(Pass):
    """Erases the return, then raises: the IR it leaves behind is half-rewritten."""

    name: ClassVar[str] = "test-crash"
    after_ops: int = 2

    def run(self, module: Module) -> bool:
        module.function().regions[0].block.ops.pop()
        raise ZeroDivisionError(f"boom after {self.after_ops}\nsecond line")


@dataclass(frozen=True)
class Sleep(Pass):
    name: ClassVar[str] = "test-sleep"

    def run(self, module: Module) -> bool:
        time.sleep(0.01)
        return False


@dataclass(frozen=True)
class ReturnsNone(Pass):
    name: ClassVar[str] = "test-returns-none"

    def run(self, module: Module):
        return None


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """A private copy of the registry with this file's test passes."""
    monkeypatch.setattr(pass_base, "_PASSES", dict(pass_base._PASSES))
    for cls in (BreakIR, Crash, Sleep, ReturnsNone):
        register_pass(cls)


def run_printing(pipeline: str, **printing) -> str:
    stream = io.StringIO()
    PassManager(pipeline, printing=IRPrinting(stream=stream, **printing)).run(make_module())
    return stream.getvalue()


# ------------------------------------------------------------------------ IR printing


def test_print_after_all_prints_every_pass_in_order_and_the_ir_it_left():
    module = make_module()
    stream = io.StringIO()
    PassManager("canonicalize,cse,dce", printing=IRPrinting(after_all=True, stream=stream)).run(module)
    text = stream.getvalue()
    assert headers(text) == ["After canonicalize", "After cse", "After dce"]
    dumps = [dump.strip() for dump in re.split(r"^// -----//.*$", text, flags=re.MULTILINE)[1:]]
    assert dumps[-1] + "\n" == print_module(module)
    assert [d.count('"ft.mul"') for d in dumps] == [0, 0, 0]


def test_print_after_change_skips_passes_that_changed_nothing():
    assert headers(run_printing("canonicalize,cse,dce", after_change=True)) == ["After canonicalize"]


def test_print_after_change_filters_the_chosen_passes():
    assert headers(run_printing("canonicalize,cse", after=frozenset({"cse"}), after_change=True)) == []
    assert headers(run_printing("canonicalize,cse", after_all=True, after_change=True)) == ["After canonicalize"]


def test_print_before_and_after_named_passes():
    text = run_printing("canonicalize,cse,canonicalize", before=frozenset({"cse"}), after=frozenset({"canonicalize"}))
    assert headers(text) == ["After canonicalize", "Before cse", "After canonicalize"]


def test_printing_defaults_to_stderr_at_print_time(capsys):
    PassManager("cse", printing=IRPrinting(after_all=True)).run(make_module())
    assert headers(capsys.readouterr().err) == ["After cse"]


def test_print_locations():
    text = run_printing("cse", after_all=True, print_locations=True)
    assert "loc(" in text


def test_tree_dir_writes_one_folder_per_function_in_pipeline_order(tmp_path):
    stream = io.StringIO()
    printing = IRPrinting(before=frozenset({"canonicalize"}), after_all=True, tree_dir=str(tmp_path), stream=stream)
    PassManager("canonicalize,cse", printing=printing).run(make_module("main", "helper"))
    assert stream.getvalue() == ""
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.ftir"))
    expected = ["01_canonicalize_before.ftir", "01_canonicalize_after.ftir", "02_cse_after.ftir"]
    assert files == sorted(f"{function}/{name}" for function in ("main", "helper") for name in expected)
    for path in tmp_path.rglob("*.ftir"):
        module = parse_module(path.read_text(), str(path))
        assert [f.attributes["sym_name"] for f in module.functions] == [path.parent.name]
        assert ('"ft.mul"' in path.read_text()) == path.name.endswith("before.ftir")


def test_tree_dir_of_a_module_without_functions_and_of_long_pipelines(tmp_path):
    printing = IRPrinting(after=frozenset({"dce"}), tree_dir=str(tmp_path))
    PassManager(",".join(["cse"] * 99 + ["dce"]), printing=printing).run(Module.empty())
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.ftir")] == ["module/100_dce_after.ftir"]


def test_printing_an_unknown_pass_is_an_error():
    with pytest.raises(OptionsError, match=r"unknown pass.*'cannonicalize'"):
        PassManager("cse", printing=IRPrinting(after=frozenset({"cannonicalize"})))


# ------------------------------------------------------------------------ verify_each


def test_verify_each_names_the_pass_that_broke_the_ir(tmp_path):
    manager = PassManager("cse,test-break-ir,dce", reproducer_dir=str(tmp_path))
    with pytest.raises(PassError, match=r"pass 'test-break-ir' produced invalid IR: .*'ft\.exp'") as error:
        manager.run(make_module())
    assert "--verify-each" in str(error.value)
    (reproducer,) = tmp_path.iterdir()
    assert print_module(parse_module(reproducer.read_text())) == print_module(make_module())


def test_without_verify_each_broken_ir_passes_through():
    PassManager("test-break-ir", verify_each=False).run(make_module())


def test_verify_each_rejects_invalid_input_before_any_pass():
    module = make_module()
    next(op for op in module.walk() if op.name == "ft.exp").results[0].type = parse_type("tensor<5xf32>")
    with pytest.raises(VerificationError):
        PassManager("cse").run(module)


# ------------------------------------------------------------------- crash reproducers


def test_a_crashing_pass_leaves_a_reproducer_and_the_command_that_replays_it(tmp_path):
    original = print_module(make_module())
    manager = PassManager("canonicalize,test-crash{after-ops=5}", reproducer_dir=str(tmp_path))
    with pytest.raises(PassError) as error:
        manager.run(make_module())
    message = str(error.value)
    assert "\n" not in message
    assert "pass 'test-crash' failed: ZeroDivisionError: boom after 5 second line" in message
    path = tmp_path / "flagtree_repro_test-crash_0.ftir"
    assert str(path) in message
    command = shlex.split(message.split("replay with: ")[1])
    assert command[0] == "flagtree-opt" and command[2] == "-p" and Path(command[1]) == path
    assert parse_pipeline(command[3]) == [Crash(after_ops=5)]
    # The reproducer holds the IR the pass received: canonicalize's output, before the crash.
    received = parse_module(path.read_text())
    expected = make_module()
    get_pass("canonicalize")().run(expected)
    assert print_module(received) == print_module(expected) != original
    with pytest.raises(PassError):
        PassManager(command[3], reproducer_dir=str(tmp_path)).run(received)
    assert (tmp_path / "flagtree_repro_test-crash_1.ftir").exists()


def test_the_replay_command_runs(tmp_path, monkeypatch):
    """Replaying a (simulated) canonicalize crash in a fresh process runs canonicalize on the reproducer."""
    flagtree_opt = shutil.which("flagtree-opt") or shutil.which("flagtree-opt", path=str(Path(sys.executable).parent))
    if flagtree_opt is None:
        pytest.skip("flagtree-opt is not installed")

    def crash(self, module):
        raise RuntimeError("simulated")

    monkeypatch.setattr(type(get_pass("canonicalize")()), "run", crash)
    with pytest.raises(PassError) as error:
        PassManager("cse,canonicalize{max-iterations=3}", reproducer_dir=str(tmp_path)).run(make_module())
    command = shlex.split(str(error.value).split("replay with: ")[1])
    proc = subprocess.run([flagtree_opt, *command[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"ft.exp"' in proc.stdout and '"ft.mul"' not in proc.stdout


def test_reproducers_go_to_the_system_temp_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(PassError, match=re.escape(str(tmp_path / "flagtree_repro_test-crash_0.ftir"))):
        PassManager("test-crash").run(make_module())


def test_a_pass_must_say_whether_it_changed_the_ir():
    with pytest.raises(PassError, match="'test-returns-none': run\\(\\) returned None"):
        PassManager("test-returns-none").run(make_module())


# ------------------------------------------------------------------------------ timing


def test_pass_times_sum_per_pass_in_order_of_first_run():
    result = PassManager("test-sleep,cse,test-sleep,dce").run(make_module())
    assert list(result.pass_times) == ["test-sleep", "cse", "dce"]
    assert result.pass_times["test-sleep"] >= 0.02
    assert all(seconds >= 0 for seconds in result.pass_times.values())


def test_timing_report_lists_each_pass_and_the_total():
    result = PassManager("canonicalize,cse,dce,cse", timing=True).run(make_module())
    report = result.timing_report()
    assert "Execution time report" in report and "Total Execution Time" in report
    rows = re.findall(r"^\s+\d+\.\d+ \(\s*\d+\.\d%\)  (.+)$", report, re.MULTILINE)
    assert rows[:3] == ["canonicalize", "cse", "dce"] and rows[-1] == "Total"
    assert "(verify)" in rows


def test_changed_lists_the_pass_runs_that_changed_the_ir():
    result = PassManager("cse,canonicalize,dce,canonicalize").run(make_module())
    assert result.changed == ["canonicalize"]


# -------------------------------------------------------------------------- after_pass


def test_after_pass_sees_a_copy_of_the_ir_before_and_the_ir_after_each_pass():
    module = make_module()
    seen = []

    def after_pass(name: str, before: Module, after: Module) -> None:
        seen.append((name, print_module(before).count('"ft.mul"'), after is module))

    PassManager("canonicalize,cse", after_pass=after_pass).run(module)
    assert seen == [("canonicalize", 1, True), ("cse", 0, True)]


def test_the_ir_is_cloned_only_for_after_pass(monkeypatch):
    def no_cloning(module):
        raise AssertionError("cloned without an after_pass hook")

    monkeypatch.setattr(pass_manager, "clone_module", no_cloning)
    PassManager("canonicalize,cse", printing=IRPrinting(after_change=True, stream=io.StringIO())).run(make_module())


def test_a_pipeline_may_be_a_list_of_passes():
    module = make_module()
    result = PassManager([get_pass("canonicalize")(max_iterations=1)]).run(module)
    assert result.changed == ["canonicalize"] and '"ft.mul"' not in print_module(module)
    with pytest.raises(TypeError, match="Pass objects"):
        PassManager(["canonicalize"])
