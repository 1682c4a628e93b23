"""torch.compile(backend="flagtree") end to end: numerics vs eager and fp64, freezing, options,
the entry point, reports and dumps."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flagtree
from examples.zoo import ZOO
from flagtree.backends.registry import all_backends
from flagtree.errors import OptionsError
from flagtree.frontend.options import CompileOptions
from flagtree.ir import parse_module
from flagtree.passes import parse_pipeline, preset_pipeline
from tests.frontend_helpers import DEFAULT_CPU_BACKEND, assert_matches_fp64, fp64_twin

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_reports():
    flagtree.clear_reports()
    yield
    flagtree.clear_reports()


def compile_and_run(model, inputs, **options):
    with torch.no_grad():
        return torch.compile(model, backend="flagtree", options=options or None)(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_compiled_and_eager_both_match_fp64(name, dtype):
    model, inputs = ZOO[name](dtype=dtype)
    twin, twin_inputs = fp64_twin(model, inputs)
    with torch.no_grad():
        reference = twin(*twin_inputs)
        eager = model(*inputs)
    compiled = compile_and_run(model, inputs)
    assert compiled.dtype == eager.dtype and compiled.shape == eager.shape
    assert_matches_fp64(eager, reference, dtype, f"eager {name}")
    assert_matches_fp64(compiled, reference, dtype, f"compiled {name}")
    assert [r.backend for r in flagtree.reports()] == [DEFAULT_CPU_BACKEND]


def _function_signature(dump_dir: Path) -> tuple[list, list[str]]:
    """(argument types, resource names) of the dumped graph's output FTIR."""
    (output,) = dump_dir.glob("graph_*_inference/output.ftir")
    module = parse_module(output.read_text(), str(output))
    args = module.function().regions[0].block.args
    resources = [op.attributes["value"].name for op in module.walk()
                 if op.name == "ft.constant" and type(op.attributes["value"]).__name__ == "ResourceAttr"]
    return [a.type for a in args], resources


@pytest.mark.parametrize("name", ["mlp", "cnn", "deepseek_block"])
def test_freeze_gives_the_same_results_and_takes_no_parameters(name, tmp_path):
    model, inputs = ZOO[name]()
    plain = compile_and_run(model, inputs, dump_dir=str(tmp_path / "plain"))
    torch._dynamo.reset()
    frozen = compile_and_run(model, inputs, freeze=True, dump_dir=str(tmp_path / "frozen"))
    assert_matches_fp64(frozen, plain, torch.float32, f"frozen {name}")
    plain_args, _ = _function_signature(tmp_path / "plain")
    frozen_args, resources = _function_signature(tmp_path / "frozen")
    parameters = dict(model.named_parameters())
    assert sorted(resources) == sorted(parameters), "every parameter becomes a resource named after it"
    assert len(plain_args) - len(frozen_args) == len(parameters), "parameters are no longer arguments"


def test_freeze_needs_grad_disabled():
    model, inputs = ZOO["mlp"]()
    compiled = torch.compile(model, backend="flagtree", options={"freeze": True})
    with pytest.raises(Exception, match="'freeze' is for inference"):
        compiled(*inputs)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(OptionsError, match="unknown flagtree option 'opt_levl'; valid options: opt_level, pipeline"):
        CompileOptions.from_dict({"opt_levl": 3})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"opt_level": "2"}, "option 'opt_level' must be int, not str '2'"),
        ({"freeze": 1}, "option 'freeze' must be bool, not int 1"),
        ({"dump_dir": 3}, "option 'dump_dir' must be str or None, not int 3"),
        ({"opt_level": True}, "option 'opt_level' must be int, not bool True"),
        ({"opt_level": 7}, "option 'opt_level' must be 0, 1, 2 or 3, not 7"),
        ({"target": "cuda-ish"}, "unknown target 'cuda-ish' .*valid targets: .*reference"),
    ],
)
def test_bad_option_values_name_the_key_and_what_is_expected(options, message):
    with pytest.raises(OptionsError, match=message):
        CompileOptions.from_dict(options)


def test_environment_supplies_dump_dir_and_target(monkeypatch):
    monkeypatch.setenv("FLAGTREE_DUMP_DIR", "/tmp/somewhere")
    monkeypatch.setenv("FLAGTREE_BACKEND", "reference")
    options = CompileOptions.from_dict({})
    assert (options.dump_dir, options.target) == ("/tmp/somewhere", "reference")
    monkeypatch.setenv("FLAGTREE_BACKEND", "nope")
    with pytest.raises(OptionsError, match="FLAGTREE_BACKEND"):
        CompileOptions.from_dict({})


def test_bad_options_and_modes_fail_the_compile_with_the_message():
    model, inputs = ZOO["mlp"]()
    with pytest.raises(Exception, match="unknown flagtree option 'bogus'"):
        compile_and_run(model, inputs, bogus=1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode 'max-autotune' is not supported by flagtree"):
        torch.compile(model, backend="flagtree", mode="max-autotune")(*inputs)


def test_backend_resolves_through_the_entry_point_without_importing_flagtree():
    code = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        x = torch.randn(3, 8)
        assert "flagtree" not in sys.modules
        with torch.no_grad():
            y = torch.compile(model, backend="flagtree")(x)
        torch.testing.assert_close(y, model(x))
        import flagtree
        from flagtree.backends.registry import select_backend
        assert [r.backend for r in flagtree.reports()] == [select_backend(torch.device("cpu")).name]
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", capture_output=True, text=True)


def test_reports_describe_each_compiled_graph(caplog):
    model, inputs = ZOO["transformer_block"]()
    with caplog.at_level(logging.INFO, logger="flagtree"):
        compile_and_run(model, inputs)
    (report,) = flagtree.reports()
    assert report.backend == DEFAULT_CPU_BACKEND
    assert report.graph.startswith("graph_") and report.graph.endswith("_inference")
    assert report.fallbacks == {}
    groups = {kind: n for kind, n in report.fusions.items() if kind.endswith("_group")}
    assert sum(groups.values()) == report.op_counts.get("ft.fusion", 0)
    assert report.op_counts["ft.matmul"] >= 7  # q, k, v, o, and three SwiGLU projections
    assert all(count > 0 for count in report.op_counts.values())
    backend = all_backends()[report.backend]
    assert report.pipeline == ",".join(p for p in (preset_pipeline(2), backend.pipeline(backend.capabilities())) if p)
    assert set(report.pass_times) == {p.name for p in parse_pipeline(report.pipeline)}
    assert report.compile_seconds > sum(report.pass_times.values())
    assert report.dump_dir is None
    assert [r.getMessage() for r in caplog.records if r.name == "flagtree"] == [report.summary()]
    flagtree.clear_reports()
    assert flagtree.reports() == []


def test_fallbacks_are_reported_with_their_reason():
    class Model(torch.nn.Module):
        def forward(self, x):
            return torch.cosh(x) + 1

    x = torch.randn(4, 4)
    torch.testing.assert_close(compile_and_run(Model(), (x,)), torch.cosh(x) + 1)
    (report,) = flagtree.reports()
    assert report.fallbacks == {"aten.cosh.default": 1}
    assert report.fallback_reasons == {"aten.cosh.default": "no FTIR mapping yet"}
    assert "fallbacks: aten.cosh.default×1" in report.summary()


@pytest.mark.parametrize(("options", "passes"), [({"opt_level": 0}, set()), ({"pipeline": "cse,dce"}, {"cse", "dce"})])
def test_pipeline_options_choose_the_passes(options, passes):
    """The options pick the optimisation passes; the backend appends only its own lowering."""
    model, inputs = ZOO["mlp"]()
    compile_and_run(model, inputs, **options)
    (report,) = flagtree.reports()
    backend = all_backends()[report.backend]
    lowering = {p.name for p in parse_pipeline(backend.pipeline(backend.capabilities()))}
    assert set(report.pass_times) == passes | lowering


def test_dump_dir_holds_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGTREE_DUMP_DIR", str(tmp_path))
    model, inputs = ZOO["moe"]()
    compile_and_run(model, inputs)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("graph_") and folder.name.endswith("_inference")
    for name in ("fx_graph.py", "input.ftir", "output.ftir", "report.json"):
        assert (folder / name).is_file(), name
    assert "torch.ops.aten" in (folder / "fx_graph.py").read_text()
    for name in ("input.ftir", "output.ftir"):
        parse_module((folder / name).read_text(), name)
    (recorded,) = flagtree.reports()
    passes = [p.name for p in parse_pipeline(recorded.pipeline)]
    assert recorded.pipeline.startswith(preset_pipeline(2))
    written = sorted(p.name for p in (folder / "passes" / "main").iterdir())
    expected = sorted(f"{i:02d}_{name}_{when}.ftir" for i, name in enumerate(passes, 1) for when in ("before", "after"))
    assert written == expected
    report = json.loads((folder / "report.json").read_text())
    assert report["graph"] == recorded.graph == folder.name
    assert report["dump_dir"] == str(folder)
    assert report["op_counts"] == recorded.op_counts


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_library_model_built_from_its_config_compiles_and_matches_eager():
    """A model flagtree's authors did not write: a 2-layer random-init Llama from transformers."""
    model = _tiny_llama()
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    twin = fp64_twin(model, ())[0]
    with torch.no_grad():
        reference = twin(input_ids, use_cache=False).logits
        compiled = torch.compile(model, backend="flagtree")(input_ids, use_cache=False).logits
    assert_matches_fp64(compiled, reference, torch.float32, "tiny Llama logits")
    assert flagtree.reports(), "the model compiled at least one graph through flagtree"
