"""Printed FTIR is valid MLIR: the real MLIR parser (torch-mlir's bindings, unregistered
dialects allowed) accepts it, re-prints the same ops, operand counts, result types and
attribute names, and MLIR's own generic print parses back into the same FTIR.

`dense_resource<name>` handles need no blob to parse (MLIR keeps them as undefined
handles), but MLIR renames a handle whose name an earlier module already used in the same
Context, so every check parses into a fresh Context."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.errors import SourceError
from flagtree.ir import (
    Block,
    Builder,
    DenseAttr,
    FunctionType,
    Location,
    Module,
    Region,
    ResourceAttr,
    ScalarType,
    TensorType,
    new_function,
    parse_module,
    print_module,
    verify,
)
from tests.strategies import modules, structure

whole_modules = settings(max_examples=25)  # examples that build a whole module are costly

pytestmark = pytest.mark.mlir
ir = pytest.importorskip("torch_mlir.ir", reason="MLIR's Python bindings (torch-mlir) are not installed")


def _mlir_parse(text: str):
    """The MLIR module (kept alive with its Context: MLIR objects must not outlive it)."""
    context = ir.Context()
    context.allow_unregistered_dialects = True
    return context, ir.Module.parse(text, context)


def _mlir_ops(op, out: list) -> list:
    out.append(op)
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                _mlir_ops(child.operation, out)
    return out


def _mlir_summary(module) -> list:
    """Per op in pre-order: name, operand count, result types, attribute names."""
    return [
        (op.name, len(op.operands), [str(r.type) for r in op.results], sorted(op.attributes) if len(op.attributes)
         else [])
        for op in _mlir_ops(module.operation, [])
    ]


def _ftir_summary(module: Module) -> list:
    summary = []
    for op in module.walk():
        attributes = sorted(op.attributes)
        if op.name == "func.func":  # MLIR holds the signature as an attribute; FTIR derives it from the body
            attributes = sorted({*attributes, "function_type"})
        summary.append((op.name, len(op.operands), [str(t) for t in op.result_types], attributes))
    return summary


def _every_attribute_kind() -> Module:
    """A hand-written module using every attribute kind, location form and structural form."""
    module = Module.empty()
    f32 = TensorType((2, None), ScalarType("f32"))
    _, block = new_function(module, "main", [f32, TensorType((4,), ScalarType("f4E2M1FN"))])
    b = Builder(block, location=Location("model.py", 12, 3, "aten.mm"))
    x = block.args[0]
    nan_payload = torch.tensor([0x7FC00001, 0xFFC00000 - 2**32], dtype=torch.int32).view(torch.float32)
    attributes = {
        "int": -(2**63), "big": 2**63 - 1, "float": 0.1, "neg_zero": -0.0, "inf": math.inf, "nan": math.nan,
        "subnormal": 5e-324, "tiny": 1e-300, "true": True, "false": False, "unit": None,
        "string": 'quote " backslash \\ tab \t newline \n nul \x00 ümlaut 日本 🙂', "empty_string": "",
        "array": (0, -1, 2**62), "empty_array": (), "list": [1, [2.5, "x"], []], "empty_dict": {},
        "dict": {"nested": {"deeper": None}, "needs quotes": 1, "a-b": 2, "with$dollar.dot": 3},
        "scalar_type": ScalarType("f8E8M0FNU"), "tensor_type": TensorType((None, 3, 0), ScalarType("bf16")),
        "function_type": FunctionType((ScalarType("i1"),), (TensorType((2,), ScalarType("f16")),)),
        "dense_f32": DenseAttr(torch.tensor([[1.5, -0.0], [math.inf, 1e-45]])),
        "dense_nan": DenseAttr(nan_payload),
        "dense_splat_bf16": DenseAttr(torch.full((3, 2), -2.5, dtype=torch.bfloat16)),
        "dense_f8": DenseAttr(torch.tensor([448.0, -0.5, math.nan]).to(torch.float8_e4m3fn)),
        "dense_f8e5m2": DenseAttr(torch.tensor([57344.0, math.inf]).to(torch.float8_e5m2)),
        "dense_e8m0": DenseAttr(torch.tensor([2.0**-127, 1.0, 2.0**127]).to(torch.float8_e8m0fnu)),
        "dense_i1": DenseAttr(torch.tensor([True, False, True])), "dense_i64": DenseAttr(torch.tensor([-(2**63), 7])),
        "dense_scalar": DenseAttr(torch.tensor(3.25, dtype=torch.float16)), "dense_empty": DenseAttr(torch.zeros(0, 3)),
        "resource": ResourceAttr("weights.w_q$0", TensorType((4,), ScalarType("f4E2M1FN"))),
    }
    call = b.create("ft.torch_call", [x], {"target": "aten::add.Tensor", "args": [{"operand": 0}],
                                           "kwargs": attributes}, [f32, ScalarType("i64")])
    size = b.value("ft.dim", x, dim=-1)
    weight = b.create("ft.constant", [], {"value": ResourceAttr("w0", TensorType((4, 8), ScalarType("f8E4M3FN")))},
                      [TensorType((4, 8), ScalarType("f8E4M3FN"))], location=Location(name="weight"))
    inner = Block([f32])
    Builder(inner).create("ft.yield", [Builder(inner).value("ft.exp", inner.args[0])], {}, [])
    fused = b.create("ft.fusion", [call.results[0]], {"kind": "élémentwise \"exp\""}, None, [Region([inner])],
                     location=Location("fx", 0, 0))
    values, indices = b.create("ft.topk", [fused.result], {"k": 1, "dim": -1, "largest": True, "sorted": True},
                               location=Location()).results
    b.create("func.return", [values, indices, size, weight.result], {}, [])
    return module


def test_every_attribute_kind_module_is_valid_ftir():
    verify(_every_attribute_kind())


@pytest.mark.parametrize("print_locations", [False, True])
def test_mlir_accepts_every_attribute_kind(print_locations):
    module = _every_attribute_kind()
    _, parsed = _mlir_parse(print_module(module, print_locations=print_locations))
    assert _mlir_summary(parsed) == _ftir_summary(module)


@whole_modules
@given(module=modules())
def test_mlir_accepts_generated_modules_and_reprints_the_same_ops(module):
    _, parsed = _mlir_parse(print_module(module, print_locations=True))
    assert _mlir_summary(parsed) == _ftir_summary(module)


@whole_modules
@given(module=modules())
def test_mlir_generic_print_parses_back_to_the_same_ftir(module):
    """MLIR's own spelling (e.g. `1.000000e+00`, `\\22`, unit attributes as bare names) is
    FTIR too, and denotes the same IR bit for bit (locations aside: MLIR prints them as aliases)."""
    _, parsed = _mlir_parse(print_module(module, print_locations=True))
    reprinted = parsed.operation.get_asm(print_generic_op_form=True)
    assert structure(parse_module(reprinted, "mlir.ftir"), with_locations=False) == structure(
        module, with_locations=False)


def test_every_attribute_kind_survives_mlir_bit_for_bit():
    module = _every_attribute_kind()
    _, parsed = _mlir_parse(print_module(module))
    back = parse_module(parsed.operation.get_asm(print_generic_op_form=True), "mlir.ftir")
    assert structure(back, with_locations=False) == structure(module, with_locations=False)


def test_resource_handles_keep_their_names_in_a_fresh_context():
    text = print_module(_every_attribute_kind())
    _, parsed = _mlir_parse(text)
    reprinted = str(parsed)
    assert "dense_resource<w0>" in reprinted
    assert "dense_resource<weights.w_q$0>" in reprinted


def _resource_constants(names: list[str]) -> Module:
    """A module returning one ft.constant per name, each a resource of that name."""
    module = Module.empty()
    weight = TensorType((2,), ScalarType("f32"))
    _, block = new_function(module, "main", [])
    b = Builder(block)
    constants = [b.value("ft.constant", result_type=weight, value=ResourceAttr(name, weight)) for name in names]
    b.create("func.return", constants, {}, [])
    return module


def _resource_names(module: Module) -> list[str]:
    return [op.attributes["value"].name for op in module.walk() if op.name == "ft.constant"]


# Names near the edge of MLIR's bare identifier [A-Za-z_][A-Za-z0-9_$.]*, and anything else.
resource_names = st.one_of(st.text(alphabet="aZ_09$.-: \"\\\n日", min_size=1, max_size=8),
                           st.text(min_size=1, max_size=8))


@given(names=st.lists(resource_names, min_size=1, max_size=3))
def test_any_resource_name_survives_mlir(names):
    """Any string names a resource: what is no MLIR bare identifier prints as a string literal,
    MLIR parses it, and MLIR's own print of it parses back to the same name."""
    module = _resource_constants(names)
    text = print_module(module)
    _, parsed = _mlir_parse(text)
    assert _resource_names(parse_module(text)) == names
    assert _resource_names(parse_module(parsed.operation.get_asm(print_generic_op_form=True), "mlir.ftir")) == names


def test_an_empty_resource_name_is_rejected():
    """MLIR would give each use of an empty handle its own name (the second becomes `_1`)."""
    with pytest.raises(ValueError, match="non-empty name"):
        ResourceAttr("", TensorType((2,), ScalarType("f32")))
    text = print_module(_resource_constants(["w"])).replace("dense_resource<w>", 'dense_resource<"">')
    with pytest.raises(SourceError, match=r"^empty\.ftir:4:\d+: error: a dense_resource needs a non-empty name"):
        parse_module(text, "empty.ftir")
