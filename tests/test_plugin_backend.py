"""Capabilities drive lowering, with no vendor checks in any pass.

- legalize-dtypes on random modules: afterwards nothing computes in a non-native type,
  signatures stay, results stay (within the dtype's tolerance; exact for integers);
- the sample out-of-tree backend (examples/pretend_chip), pip-installed into a temporary
  directory and found through the `flagtree.backends` entry point: its pipeline, derived
  from its capabilities, lowers a bf16 module to f32 and keeps fused kernels small, while
  the same code given the capabilities of a chip with bf16 keeps bf16 and one big kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# Registers the passes (explicitly, so these tests do not depend on who imports them).
import flagtree.passes.fuse_elementwise  # noqa: F401
from flagtree.backends.reference.executor import run_module
from flagtree.errors import OptionsError, PassError
from flagtree.ir import Builder, Module, Operation, ScalarType, TensorType, clone_module, parse_module, verify
from flagtree.ir.builder import new_function
from flagtree.ir.printer import function_type
from flagtree.ir.types import ELEMENT_TYPE_NAMES
from flagtree.passes import PassManager, parse_pipeline
from flagtree.passes.legalize_dtypes import LegalizeDtypes
from tests.strategies import random_inputs, runnable_modules, seeds, structure

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "pretend_chip"
# Ops that move or produce data without arithmetic on it: they may keep any element type.
DATA_MOVEMENT = {
    "ft.cast", "ft.constant", "ft.full", "ft.iota", "ft.torch_call", "ft.fusion", "ft.yield", "func.return",
    "func.func", "builtin.module", "ft.reshape", "ft.transpose", "ft.broadcast_to", "ft.slice", "ft.concat",
    "ft.pad", "ft.flip", "ft.gather", "ft.dim",
}
# Relative L2 error allowed per element type (the team's tolerances, see DESIGN.md).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def legalize(module: Module, native: tuple[str, ...]) -> bool:
    result = PassManager([LegalizeDtypes(native)]).run(module)
    return "legalize-dtypes" in result.changed


def computing_dtypes(module: Module) -> set[str]:
    """The element types arithmetic ops read or produce as tensors."""
    return {
        v.type.dtype.name
        for op in module.walk() if op.name not in DATA_MOVEMENT
        for v in [*op.operands, *op.results] if isinstance(v.type, TensorType)
    }


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert expected.dtype == actual.dtype and expected.shape == actual.shape
    if not expected.is_floating_point():
        assert torch.equal(expected, actual)
        return
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(special(expected), special(actual))
    finite = torch.isfinite(expected)
    e, a = expected[finite].double(), actual[finite].double()
    error = (e - a).norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny)
    assert error <= TOLERANCE[expected.dtype], f"relative L2 error {error:.3g}"


# ---------------------------------------------------------------- legalize-dtypes


@given(runnable_modules(max_ops=10), st.sets(st.sampled_from(["f16", "bf16"])), seeds())
def test_legalised_modules_compute_only_in_native_types(module, native_floats, seed):
    native = ("f32", "i1", "i64", *sorted(native_floats))
    before = clone_module(module)
    legalize(module, native)
    verify(module)
    assert computing_dtypes(module) <= set(native)
    assert function_type(module.function("main")) == function_type(before.function("main"))
    inputs = random_inputs(before, seed)
    for expected, actual in zip(run_module(before, inputs), run_module(module, inputs)):
        assert_close(expected, actual)
    assert not legalize(module, native), "a second run changed the IR"


@given(runnable_modules(max_ops=10))
def test_a_chip_with_every_type_changes_nothing(module):
    before = clone_module(module)
    assert not legalize(module, ELEMENT_TYPE_NAMES)
    assert structure(module) == structure(before)


def _bf16_function(body) -> Module:
    """A module whose @main takes two 4-element bf16 tensors and returns `body(builder, x, y)`."""
    module = Module.empty()
    bf16 = TensorType((4,), ScalarType("bf16"))
    _, block = new_function(module, "main", [bf16, bf16])
    builder = Builder(block)
    builder.create("func.return", [body(builder, *block.args)], {}, [])
    verify(module)
    return module


def _names_and_types(ops: list[Operation]) -> list[tuple[str, str]]:
    return [(op.name, str(op.results[0].type) if op.results else "") for op in ops]


def test_each_bf16_op_computes_in_f32_between_casts():
    module = _bf16_function(lambda b, x, y: b.value("ft.exp", b.value("ft.add", x, y)))
    assert legalize(module, ("f32", "f16"))
    ops = module.function("main").regions[0].block.ops
    assert _names_and_types(ops) == [
        ("ft.cast", "tensor<4xf32>"), ("ft.cast", "tensor<4xf32>"), ("ft.add", "tensor<4xf32>"),
        ("ft.cast", "tensor<4xbf16>"),
        ("ft.cast", "tensor<4xf32>"), ("ft.exp", "tensor<4xf32>"), ("ft.cast", "tensor<4xbf16>"),
        ("func.return", ""),
    ]


def test_ops_inside_fusion_regions_are_legalised():
    module = _bf16_function(lambda b, x, y: b.value("ft.tanh", b.value("ft.mul", x, y)))
    PassManager("fuse-elementwise").run(module)
    legalize(module, ("f32",))
    (fusion,) = [op for op in module.walk() if op.name == "ft.fusion"]
    assert computing_dtypes(module) == {"f32"}
    assert [str(t) for t in fusion.result_types] == ["tensor<4xbf16>"], "the region still yields bf16"


def test_native_must_name_element_types_and_include_f32():
    with pytest.raises(OptionsError, match=r"unknown element type.*bfloat16"):
        parse_pipeline("legalize-dtypes{native=[f32,bfloat16]}")
    with pytest.raises(OptionsError, match="must include f32"):
        parse_pipeline("legalize-dtypes{native=[f16]}")


def test_a_computation_f32_cannot_hold_is_an_error_naming_the_op():
    module = parse_module(
        '"func.func"() <{function_type = (tensor<2xf64>) -> tensor<2xf64>, sym_name = "main"}> ({\n'
        '^bb0(%x: tensor<2xf64>):\n'
        '  %y = "ft.exp"(%x) : (tensor<2xf64>) -> tensor<2xf64>\n'
        '  "func.return"(%y) : (tensor<2xf64>) -> ()\n'
        '}) : () -> ()\n', "wide.ftir")
    with pytest.raises(PassError, match=r"wide\.ftir:3:8: 'ft\.exp' op computes in f64"):
        legalize(module, ("f32", "i64"))


# ---------------------------------------------------------------- the out-of-tree backend

# A bf16 RMSNorm followed by a chain of activations: one reduction group of 20-odd ops once
# every bf16 op computes in f32 between casts.
PLUGIN_MODULE = """
"func.func"() <{function_type = (tensor<4x64xbf16>, tensor<64xbf16>) -> tensor<4x64xbf16>, sym_name = "main"}> ({
^bb0(%x: tensor<4x64xbf16>, %w: tensor<64xbf16>):
  %sq = "ft.mul"(%x, %x) : (tensor<4x64xbf16>, tensor<4x64xbf16>) -> tensor<4x64xbf16>
  %ms = "ft.mean"(%sq) {dims = array<i64: -1>, keepdim = true} : (tensor<4x64xbf16>) -> tensor<4x1xbf16>
  %r = "ft.rsqrt"(%ms) : (tensor<4x1xbf16>) -> tensor<4x1xbf16>
  %n = "ft.mul"(%x, %r) : (tensor<4x64xbf16>, tensor<4x1xbf16>) -> tensor<4x64xbf16>
  %y = "ft.mul"(%n, %w) : (tensor<4x64xbf16>, tensor<64xbf16>) -> tensor<4x64xbf16>
  %a = "ft.silu"(%y) : (tensor<4x64xbf16>) -> tensor<4x64xbf16>
  %b = "ft.tanh"(%a) : (tensor<4x64xbf16>) -> tensor<4x64xbf16>
  %c = "ft.add"(%b, %x) : (tensor<4x64xbf16>, tensor<4x64xbf16>) -> tensor<4x64xbf16>
  "func.return"(%c) : (tensor<4x64xbf16>) -> ()
}) : () -> ()
"""

# Runs with only the temporary install directory added to the path: everything it knows
# about the plugin comes from the entry point.
PLUGIN_SCRIPT = """
import json, sys
import torch
import flagtree.passes.fuse_elementwise, flagtree.passes.legalize_dtypes  # the passes the pipelines name
from flagtree.backends.reference.executor import run_module
from flagtree.backends.registry import all_backends, select_backend
from flagtree.ir import parse_module
from flagtree.ir.types import TensorType
from flagtree.passes import PassManager
from flagtree.passes.legalize_dtypes import computes_on_tensors

text = sys.stdin.read()
backends = all_backends()
chip = backends["pretend-chip"]

CHEAP = {"ft.cast", "ft.reshape", "ft.transpose", "ft.broadcast_to", "ft.slice", "ft.constant", "ft.yield"}

def members(ops):  # a region's ops that depend on arithmetic in it, not the cloned input casts
    derived = set()
    for op in ops:
        if op.name not in CHEAP or any(id(getattr(v, "op", None)) in derived for v in op.operands):
            derived.add(id(op))
    return [op for op in ops if id(op) in derived and op.name != "ft.yield"]

def lower(capabilities):
    module = parse_module(text)
    pipeline = chip.pipeline(capabilities)
    PassManager(pipeline).run(module)
    return pipeline, module

def describe(pipeline, module):
    dtypes = sorted({v.type.dtype.name for op in module.walk() if computes_on_tensors(op)
                     for v in [*op.operands, *op.results] if isinstance(v.type, TensorType)})
    groups = [len(members(op.regions[0].block.ops)) for op in module.walk() if op.name == "ft.fusion"]
    return {"pipeline": pipeline, "computing_dtypes": dtypes, "group_sizes": groups}

chip_caps = chip.capabilities()
pipeline, lowered = lower(chip_caps)
torch.manual_seed(0)
inputs = [torch.randn(4, 64).bfloat16(), torch.randn(64).bfloat16()]
executable = chip.compile(lowered, chip_caps)
try:
    chip.compile(parse_module(text), chip_caps)
    refused = ""
except Exception as error:
    refused = str(error)
print(json.dumps({
    "priorities": {name: backend.priority for name, backend in backends.items()},
    "selected_for_cpu": select_backend(torch.device("cpu")).name,
    "supports_cpu": chip.supports(torch.device("cpu")),
    "capabilities": {"dtypes": sorted(chip_caps.dtypes), "shared_memory_bytes": chip_caps.shared_memory_bytes},
    "pretend_chip": describe(pipeline, lowered),
    "chip_with_bf16": describe(*lower(backends["reference"].capabilities())),
    "executable_backend": executable.backend,
    "outputs": [t.float().tolist() for t in executable(*inputs)],
    "eager_outputs": [t.float().tolist() for t in run_module(parse_module(text), inputs)],
    "unlowered_refused": refused,
}))
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """examples/pretend_chip pip-installed into a temporary directory (built from a copy,
    so the build leaves nothing behind in the repository)."""
    work = tmp_path_factory.mktemp("pretend_chip")
    source = shutil.copytree(PLUGIN, work / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def test_the_pretend_chip_plugs_in_and_its_capabilities_shape_the_pipeline(plugin_path, tmp_path):
    # Run from an empty folder: a stale flagtree.egg-info in the repository root would
    # otherwise shadow the installed package's entry points.
    proc = subprocess.run([sys.executable, "-c", PLUGIN_SCRIPT], input=PLUGIN_MODULE, capture_output=True,
                          text=True, cwd=tmp_path, env={**_environment(), "PYTHONPATH": str(plugin_path)},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    assert report["priorities"]["pretend-chip"] == -10
    assert report["selected_for_cpu"] != "pretend-chip", "a low-priority plugin must not win by default"
    assert report["supports_cpu"]
    assert "bf16" not in report["capabilities"]["dtypes"]
    assert report["capabilities"]["shared_memory_bytes"] == 16 * 1024

    small = report["pretend_chip"]
    assert small["pipeline"].startswith("legalize-dtypes{native=[")
    assert "fuse-elementwise{max-ops=16}" in small["pipeline"]
    assert small["computing_dtypes"] == ["f32"], "every bf16 computation moved to f32"
    assert len(small["group_sizes"]) > 1 and all(size <= 16 for size in small["group_sizes"])

    big = report["chip_with_bf16"]
    assert "max-ops" not in big["pipeline"]
    assert big["computing_dtypes"] == ["bf16"], "a chip with bf16 keeps computing in bf16"
    assert len(big["group_sizes"]) == 1

    assert report["executable_backend"] == "pretend-chip"
    for expected, actual in zip(report["eager_outputs"], report["outputs"]):
        assert_close(torch.tensor(expected).bfloat16(), torch.tensor(actual).bfloat16())
    assert "computes in bf16" in report["unlowered_refused"]


def test_no_pass_checks_for_a_vendor():
    """Passes decide from their options (which backends derive from capabilities), never by
    asking which chip or backend they run for."""
    for path in (ROOT / "passes").glob("*.py"):
        text = path.read_text().lower()
        for word in ("pretend", "torch.cuda", "torch.version", "get_device_name", "device.type"):
            assert word not in text, f"{path.name} mentions {word!r}"


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
