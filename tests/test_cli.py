"""flagtree-opt and flagtree: exit codes, one-line errors, semantic checking, dump, backends.

Most tests call the entry points' `main()` in-process (one torch import for the whole
file); a few run the installed commands to check the entry points themselves.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagtree.backends.registry import all_backends, select_backend
from flagtree.cli import main as flagtree_main
from flagtree.cli import opt
from flagtree.cli.semantics import (
    DEFAULT_DYNAMIC_SIZE,
    SYMBOL_SIZES,
    TOLERANCES,
    SemanticChecker,
    SemanticsError,
    compare_results,
    random_arguments,
)
from flagtree.ir import Builder, DenseAttr, Module, parse_module, print_module
from flagtree.passes import Pass, PassManager, base, parse_pipeline, register_pass

SQUARE = """\
"func.func"() <{function_type = (tensor<4x?xf32>) -> tensor<4x?xf32>, sym_name = "main"}> ({
^bb0(%x: tensor<4x?xf32>):
  %sq = "ft.mul"(%x, %x) : (tensor<4x?xf32>, tensor<4x?xf32>) -> tensor<4x?xf32>
  "func.return"(%sq) : (tensor<4x?xf32>) -> ()
}) : () -> ()
"""


@pytest.fixture
def square_file(tmp_path: Path) -> Path:
    path = tmp_path / "square.ftir"
    path.write_text(SQUARE)
    return path


def run_opt(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """flagtree-opt in-process: (exit status, stdout, stderr)."""
    try:
        status = opt.main(list(argv))
    except SystemExit as e:  # argparse usage errors and --help
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------- flagtree-opt basics


def test_no_pipeline_prints_the_module_unchanged(capsys, square_file):
    status, out, err = run_opt(capsys, str(square_file))
    assert status == 0 and err == ""
    assert out == print_module(parse_module(SQUARE))
    assert print_module(parse_module(out)) == out


def test_reads_stdin_and_writes_output_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(SQUARE))
    target = tmp_path / "out.ftir"
    status, out, _ = run_opt(capsys, "-", "-o", str(target))
    assert status == 0 and out == ""
    assert target.read_text() == print_module(parse_module(SQUARE))


def test_print_debuginfo_prints_source_locations(capsys, square_file):
    status, out, _ = run_opt(capsys, str(square_file), "--print-debuginfo")
    assert status == 0
    # `"ft.mul"` starts on line 3, column 9 of the input (after `  %sq = `).
    assert f'loc("{square_file}":3:9)' in out


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        # A missing comma: the parser names the position and what it expected.
        (lambda t: t.replace("(%x, %x)", "(%x %x)"), ["square.ftir:3:21:", "expected", "found '%x'"]),
        # The op's result type contradicts its operands: the verifier names the op and where it is.
        (lambda t: t.replace("-> tensor<4x?xf32>\n  \"func", "-> tensor<4x?xf16>\n  \"func"),
         ["square.ftir:4:"]),
        (lambda t: t.replace('"ft.mul"(%x, %x) :', '"ft.softmax"(%x) :').replace(
            "(tensor<4x?xf32>, tensor<4x?xf32>) -> tensor<4x?xf32>", "(tensor<4x?xf32>) -> tensor<4x?xf32>"),
         ["square.ftir:3:9", "'ft.softmax' op", "requires attribute 'dim'"]),
    ],
    ids=["parse-error", "type-mismatch", "verifier-error"],
)
def test_bad_input_is_one_line_naming_the_position(capsys, tmp_path, edit, fragments):
    path = tmp_path / "square.ftir"
    path.write_text(edit(SQUARE))
    status, out, err = run_opt(capsys, str(path))
    assert_one_line_error(status, err, "flagtree-opt: error:", *fragments)
    assert out == ""


def test_missing_file_is_one_line(capsys, tmp_path):
    status, _, err = run_opt(capsys, str(tmp_path / "absent.ftir"))
    assert_one_line_error(status, err, "absent.ftir", "No such file")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--target=reference", "--emit=mlir"], ["--emit=mlir: backend 'reference' emits no artifacts"]),
        (["--target=reference", "--emit=triton"], ["--emit=triton: backend 'reference' emits no artifacts"]),
        (["--target=no-such-chip"], ["unknown backend 'no-such-chip'", "reference"]),
        (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
        (["--emit=llvm"], ["invalid choice: 'llvm'"]),
    ],
)
def test_unavailable_or_unknown_options_fail_clearly(capsys, square_file, flags, fragments):
    status, out, err = run_opt(capsys, str(square_file), *flags)
    assert_one_line_error(status, err, *fragments)
    assert out == ""


def test_target_reference_is_accepted(capsys, square_file):
    status, out, _ = run_opt(capsys, str(square_file), "--target=reference")
    assert status == 0 and out == print_module(parse_module(SQUARE))


def test_explain_without_fusion_passes_says_there_is_nothing_to_explain(capsys, square_file):
    status, out, err = run_opt(capsys, str(square_file), "--explain")
    assert status == 0 and out
    assert "no fusion pass in pipeline" in err and "nothing to explain" in err


def test_explain_names_the_fusion_passes_that_cannot_explain(capsys, test_passes, square_file):
    status, out, err = run_opt(capsys, str(square_file), "-p", "cse,fuse-nothing", "--explain")
    assert status == 0 and out
    assert "fuse-nothing cannot report why a pattern did not fuse" in err


def test_pipeline_flags_without_a_pipeline_say_they_did_nothing(capsys, square_file):
    status, _, err = run_opt(capsys, str(square_file), "--timing", "--check-semantics")
    assert status == 0
    assert "--timing, --check-semantics did nothing" in err


def test_help_documents_every_flag_and_its_default():
    for action in opt.build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.option_strings != ["--list-passes"]:
            assert "default" in action.help, f"{action.option_strings} does not state its default"


def test_debug_shows_the_traceback(square_file, tmp_path):
    broken = tmp_path / "broken.ftir"
    broken.write_text(SQUARE.replace("(%x, %x)", "(%x %x)"))
    quiet = subprocess.run([sys.executable, "-m", "flagtree.cli.opt", str(broken)], capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-m", "flagtree.cli.opt", str(broken), "--debug"], capture_output=True,
                          text=True)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "SourceError" in loud.stderr


# --------------------------------------------------------------------------- semantic checker


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@given(st.sampled_from(FLOAT_DTYPES), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_results_equal_to_themselves_match(dtype, n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0] = float("nan")
    assert compare_results([x, 3], [x.clone(), 3]) is None


@given(st.sampled_from(FLOAT_DTYPES), st.integers(2, 64), st.integers(0, 2**31 - 1))
def test_a_change_beyond_tolerance_is_reported_with_its_size(dtype, n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).double() + 4
    # Scaling by (1 + 10 tol) has relative L2 error 10 tol, whatever x is.
    scaled = x * (1 + 10 * TOLERANCES[dtype])
    mismatch = compare_results([x.to(dtype)], [scaled.to(dtype)])
    assert mismatch is not None and mismatch.output == 0
    assert TOLERANCES[dtype] < mismatch.error < 20 * TOLERANCES[dtype]
    assert "relative L2 error" in str(mismatch)


@given(st.integers(1, 32), st.integers(0, 2**31 - 1), st.data())
def test_moved_nans_and_changed_integers_are_reported(n, seed, data):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    i = data.draw(st.integers(0, n - 1))
    with_nan = x.clone()
    with_nan[i] = float("nan")
    assert "NaN" in compare_results([x], [with_nan]).detail
    ints = torch.randint(-5, 5, (n,), generator=gen)
    changed = ints.clone()
    changed[i] += 1
    assert "1 of" in compare_results([ints], [changed]).detail


def test_dtype_shape_and_count_changes_are_reported():
    x = torch.ones(2, 3)
    assert "dtype" in compare_results([x], [x.double()]).detail
    assert "shape" in compare_results([x], [x.reshape(3, 2)]).detail
    assert "results instead of" in compare_results([x], [x, x]).detail
    assert compare_results([4], [5]) is not None


def _function_with_args(arg_types: str, symbols: str | None):
    attrs = f" {{ft.symbols = {symbols}}}" if symbols else ""
    text = (f'"func.func"() <{{function_type = ({arg_types}) -> (), sym_name = "main"}}> ({{\n'
            f"^bb0({', '.join(f'%a{i}: {t}' for i, t in enumerate(arg_types.split(', ')))}):\n"
            f'  "func.return"() : () -> ()\n}}){attrs} : () -> ()\n')
    return parse_module(text).function("main")


@given(st.integers(0, 2**31 - 1))
def test_symbols_naming_every_dynamic_dim_size_them_consistently(seed):
    # s0 is dim 0 of %a0 and the size argument %a2; s1 is dim 2 of %a0 and dim 0 of %a1.
    func = _function_with_args(
        "tensor<?x4x?xf16>, tensor<?xi32>, i64, tensor<2xi1>",
        "{s0 = array<i64: 0, 0>, s1 = array<i64: 0, 2>, s2 = array<i64: 1, 0>, s3 = array<i64: 2>}",
    )
    a, b, size, mask = random_arguments(func, torch.Generator().manual_seed(seed))
    assert a.dtype == torch.float16 and b.dtype == torch.int32 and mask.dtype == torch.bool
    assert a.shape[1] == 4 and mask.shape == (2,)
    for dim in (a.shape[0], a.shape[2], b.shape[0], size):
        assert SYMBOL_SIZES[0] <= dim <= SYMBOL_SIZES[1]


def test_distinct_symbols_get_independent_sizes():
    func = _function_with_args("tensor<?x?xf32>", "{s0 = array<i64: 0, 0>, s1 = array<i64: 0, 1>}")
    shapes = {tuple(random_arguments(func, torch.Generator().manual_seed(s))[0].shape) for s in range(20)}
    assert any(rows != cols for rows, cols in shapes)


@pytest.mark.parametrize("symbols", [None, "{s0 = array<i64: 0, 0>}"], ids=["no-symbols", "partial-symbols"])
def test_unnamed_dynamic_dims_all_get_the_default_size(symbols):
    # With a dim whose symbol is unknown, one size for all is the only consistent choice.
    func = _function_with_args("tensor<?x?xf32>, i64", symbols)
    x, n = random_arguments(func, torch.Generator().manual_seed(0))
    assert list(x.shape) == [DEFAULT_DYNAMIC_SIZE] * 2 and n == DEFAULT_DYNAMIC_SIZE


def test_malformed_symbols_attribute_is_reported():
    func = _function_with_args("tensor<?xf32>", "{s0 = array<i64: 0, 5>}")
    with pytest.raises(SemanticsError, match=r"ft\.symbols"):
        random_arguments(func, torch.Generator())


def test_random_arguments_are_fresh_draws():
    func = _function_with_args("tensor<8xf32>", None)
    first, second = (random_arguments(func, torch.Generator().manual_seed(s))[0] for s in (1, 2))
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------- passes through the CLI

MULTIPLY_BY_ONE = """\
"func.func"() <{function_type = (tensor<5xf32>) -> tensor<5xf32>, sym_name = "main"}> ({
^bb0(%x: tensor<5xf32>):
  %one = "ft.constant"() {value = dense<1.0> : tensor<5xf32>} : () -> tensor<5xf32>
  %y = "ft.mul"(%x, %one) : (tensor<5xf32>, tensor<5xf32>) -> tensor<5xf32>
  %e = "ft.exp"(%y) : (tensor<5xf32>) -> tensor<5xf32>
  "func.return"(%e) : (tensor<5xf32>) -> ()
}) : () -> ()
"""


@dataclass(frozen=True)
class ExpToExp2(Pass):
    """A wrong rewrite: exp(x) → exp2(x)."""

    name: ClassVar[str] = "test-exp-to-exp2"

    def run(self, module: Module) -> bool:
        changed = False
        for op in [op for op in module.walk() if op.name == "ft.exp"]:
            op.replace_with([Builder.before_op(op).value("ft.exp2", op.operands[0])])
            changed = True
        return changed


@dataclass(frozen=True)
class NudgeExp(Pass):
    """A subtly wrong rewrite: exp(x) → exp(x) * (1 + 1e-3), far beyond f32's 1e-5."""

    name: ClassVar[str] = "test-nudge-exp"

    def run(self, module: Module) -> bool:
        changed = False
        for op in [op for op in module.walk() if op.name == "ft.exp"]:
            builder = Builder.before_op(op)
            factor = DenseAttr(torch.full(op.result.type.shape, 1 + 1e-3))
            nudged = builder.value("ft.mul", builder.value("ft.exp", op.operands[0]),
                                   builder.value("ft.constant", result_type=op.result.type, value=factor))
            op.replace_with([nudged])
            changed = True
        return changed


@dataclass(frozen=True)
class Crash(Pass):
    """A pass that raises."""

    name: ClassVar[str] = "test-crash"

    def run(self, module: Module) -> bool:
        raise RuntimeError("boom")


@dataclass(frozen=True)
class FuseNothing(Pass):
    """Stands for a fusion pass without an `explain` option."""

    name: ClassVar[str] = "fuse-nothing"

    def run(self, module: Module) -> bool:
        return False


@pytest.fixture
def test_passes(monkeypatch):
    """Register the test passes for one test only."""
    monkeypatch.setattr(base, "_PASSES", dict(base._PASSES))
    for pass_class in (ExpToExp2, NudgeExp, Crash, FuseNothing):
        register_pass(pass_class)


@pytest.fixture
def multiply_file(tmp_path: Path) -> Path:
    path = tmp_path / "mul1.ftir"
    path.write_text(MULTIPLY_BY_ONE)
    return path


def test_check_semantics_names_the_first_pass_that_changes_a_result(capsys, test_passes, multiply_file):
    status, out, err = run_opt(capsys, str(multiply_file), "-p", "canonicalize,test-exp-to-exp2,cse",
                               "--check-semantics", "--seed", "3")
    assert_one_line_error(status, err, "pass 'test-exp-to-exp2' changes the result of @main", "result #0",
                          "relative L2 error", "seed 3", "--seed=3")
    assert out == ""


def test_check_semantics_reports_by_how_much(capsys, test_passes, multiply_file):
    status, _, err = run_opt(capsys, str(multiply_file), "-p", "test-nudge-exp", "--check-semantics")
    assert_one_line_error(status, err, "pass 'test-nudge-exp'", "relative L2 error 0.001 exceeds the 1e-05 tolerance")


def test_wrong_pass_passes_without_check_semantics(capsys, test_passes, multiply_file):
    status, out, _ = run_opt(capsys, str(multiply_file), "-p", "test-exp-to-exp2")
    assert status == 0 and "ft.exp2" in out


def test_semantic_checker_as_a_pass_manager_hook(test_passes):
    module = parse_module(MULTIPLY_BY_ONE)
    checker = SemanticChecker(module, seed=0)
    PassManager("O2", after_pass=checker).run(module)
    assert checker.passes_checked == len(parse_pipeline("O2"))
    with pytest.raises(SemanticsError, match="test-exp-to-exp2"):
        PassManager("test-exp-to-exp2", after_pass=SemanticChecker(module, seed=0)).run(module)


def test_check_semantics_accepts_the_real_passes(capsys, multiply_file):
    status, out, err = run_opt(capsys, str(multiply_file), "-p", "O2", "--check-semantics", "--seed=5")
    assert status == 0
    assert f"{len(parse_pipeline('O2'))} pass runs keep every result on random inputs (seed 5)" in err
    assert "ft.mul" not in out


def test_crashing_pass_is_one_line_with_a_replay_command(capsys, test_passes, multiply_file, tmp_path):
    status, _, err = run_opt(capsys, str(multiply_file), "-p", "canonicalize,test-crash",
                             "--crash-reproducer-dir", str(tmp_path / "repro"))
    assert_one_line_error(status, err, "pass 'test-crash' failed: RuntimeError: boom", "replay with: flagtree-opt")
    reproducers = list((tmp_path / "repro").glob("*.ftir"))
    assert len(reproducers) == 1
    # The reproducer holds what canonicalize produced, and replays to the same failure.
    assert "ft.mul" not in reproducers[0].read_text()
    status, _, err = run_opt(capsys, str(reproducers[0]), "-p", "test-crash",
                             "--crash-reproducer-dir", str(tmp_path / "again"))
    assert_one_line_error(status, err, "pass 'test-crash' failed: RuntimeError: boom")


@pytest.mark.parametrize(
    ("pipeline", "fragments"),
    [
        ("canonicalise", ["unknown pass 'canonicalise'", "did you mean 'canonicalize'"]),
        ("fold{max-elements=-1}", ["max-elements must not be negative"]),
        ("cse{x=1}", ["pass 'cse' has no option 'x'"]),
    ],
)
def test_pipeline_errors_are_one_line(capsys, square_file, pipeline, fragments):
    status, out, err = run_opt(capsys, str(square_file), "-p", pipeline)
    assert_one_line_error(status, err, "flagtree-opt: error:", *fragments)
    assert out == ""


def test_list_passes_shows_every_pass_and_option(capsys):
    status, out, _ = run_opt(capsys, "--list-passes")
    assert status == 0
    for name, pass_class in base.all_passes().items():
        assert name in out
        for option in pass_class.options():
            assert option in out


# --------------------------------------------------------------------------- flagtree


def test_backends_lists_every_registered_backend_honestly(capsys):
    assert flagtree_main.main(["backends"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["backend", "priority", "available", "details"]
    assert rows["reference"][2] == "yes"
    assert set(rows) == set(all_backends())
    for name, backend in all_backends().items():
        if not backend.availability().ok:
            assert rows[name][2] == "no" and len(rows[name]) > 3, f"unavailable backend {name} must say why"


def test_unavailable_target_names_the_reason(capsys, square_file):
    unavailable = [name for name, backend in all_backends().items() if not backend.availability().ok]
    if not unavailable:
        pytest.skip("every registered backend is available on this machine")
    status, _, err = run_opt(capsys, str(square_file), f"--target={unavailable[0]}")
    assert_one_line_error(status, err, f"backend '{unavailable[0]}' is not available here", "available backends")


def test_flagtree_opt_is_an_alias(capsys, square_file):
    assert flagtree_main.main(["opt", str(square_file)]) == 0
    assert capsys.readouterr().out == print_module(parse_module(SQUARE))


def test_flagtree_help_documents_each_subcommand():
    parser = flagtree_main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"dump", "backends", "opt"}
    assert all(choice.help for choice in commands._choices_actions)
    dump_actions = commands.choices["dump"]._actions
    assert all(a.help for a in dump_actions)


def test_console_scripts_are_installed(square_file):
    bin_dir = Path(sys.executable).parent
    for command in (["flagtree-opt", str(square_file)], ["flagtree", "backends"]):
        proc = subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


TINY_SCRIPT = """\
import sys
import torch

def f(x, y):
    return torch.relu(x * 2 + y).sum(-1)

compiled = torch.compile(f, backend="flagtree")
x, y = torch.randn(3, 4), torch.randn(3, 4)
torch.testing.assert_close(compiled(x, y), f(x, y))
print("script args:", sys.argv[1:])
"""


def test_dump_runs_the_script_and_summarizes_each_graph(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FLAGTREE_DUMP_DIR", raising=False)
    script = tmp_path / "tiny.py"
    script.write_text(TINY_SCRIPT)
    dump_dir = tmp_path / "dump"
    assert flagtree_main.main(["dump", str(script), "--dump-dir", str(dump_dir), "--", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "script args: ['--steps', '1']" in out
    graphs = [p for p in dump_dir.iterdir() if p.is_dir()]
    assert len(graphs) == 1
    for name in ("fx_graph.py", "input.ftir", "output.ftir", "plan.py", "report.json"):
        assert (graphs[0] / name).is_file()
        assert name in out
    # The launch plan is the one the graph ran: it calls the kernel of the fused relu(x * 2 + y).sum(-1).
    plan = (graphs[0] / "plan.py").read_text()
    assert "def run(arg0, arg1):" in plan and "fused_" in plan
    # ... and the kernels it launches, in each form the backend prints (the cpu backend: MLIR).
    backend = select_backend(torch.device("cpu"))
    for form in set(backend.emit_forms()) - {"python"}:
        assert "fused_" in (graphs[0] / f"kernels.{form}").read_text()
    assert f"1 graph dumped under {dump_dir}/" in out
    backend = select_backend(torch.device("cpu")).name
    assert f"backend={backend}" in out and "pass times: " in out and "canonicalize" in out
    # The environment is restored after the script.
    assert "FLAGTREE_DUMP_DIR" not in os.environ
    # The dumped FTIR is valid flagtree-opt input.
    assert run_opt(capsys, str(graphs[0] / "input.ftir"), "-p", "O2", "--check-semantics")[0] == 0


def test_dump_reports_a_failing_script(capsys, tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    assert flagtree_main.main(["dump", str(script), "--dump-dir", str(tmp_path / "d")]) == 3
    captured = capsys.readouterr()
    assert "no graph was dumped" in captured.out
    assert "exited with status 3" in captured.err

