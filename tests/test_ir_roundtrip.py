"""FTIR text round-trips exactly: print(parse(print(m))) == print(m), parsing preserves
structure bit for bit (floats, NaN payloads, -0.0, dense data, unicode strings), and every
generated module verifies before and after the trip."""

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.reference.executor import run_module
from flagtree.ir import (
    Block,
    DenseAttr,
    Location,
    Module,
    Operation,
    Region,
    TensorType,
    clone_module,
    parse_module,
    parse_type,
    print_module,
    verify,
)
from flagtree.ir.core import UNKNOWN_LOC
from tests.strategies import (
    attribute_key,
    attribute_values,
    dense_values,
    floats_with_edges,
    locations,
    modules,
    random_inputs,
    runnable_modules,
    seeds,
    structure,
    tensor_types,
)

whole_modules = settings(max_examples=25)  # examples that build a whole module are costly


def _module_with_op(attributes: dict, location: Location = UNKNOWN_LOC) -> Module:
    """A module holding one attribute-carrying op (no function: the text form allows it, and
    it isolates the attribute under test from op verification)."""
    module = Module.empty()
    module.body.append(Operation("test.attrs", attributes=attributes, location=location))
    return module


def _reparse(module: Module, print_locations: bool = True) -> Module:
    return parse_module(print_module(module, print_locations=print_locations), "roundtrip.ftir")


def _only_op(module: Module) -> Operation:
    (op,) = module.body.ops
    return op


@pytest.mark.parametrize("print_locations", [False, True])
@whole_modules
@given(module=modules())
def test_printing_parsed_text_reproduces_it(module, print_locations):
    text = print_module(module, print_locations=print_locations)
    assert print_module(parse_module(text), print_locations=print_locations) == text


@whole_modules
@given(module=modules())
def test_parse_preserves_structure_and_locations(module):
    parsed = _reparse(module)
    assert structure(parsed) == structure(module)
    assert structure(_reparse(parsed)) == structure(parsed)


@whole_modules
@given(module=modules())
def test_parse_without_locations_preserves_everything_else(module):
    parsed = _reparse(module, print_locations=False)
    assert structure(parsed, with_locations=False) == structure(module, with_locations=False)


@whole_modules
@given(module=modules())
def test_generated_modules_verify_before_and_after_the_trip(module):
    verify(module)
    verify(_reparse(module))


@whole_modules
@given(module=runnable_modules(), seed=seeds())
def test_round_trip_preserves_what_the_module_computes(module, seed):
    """Differential: the reparsed module gives bit-identical results on the same fresh inputs,
    and the results have the types the module declares."""
    inputs = random_inputs(module, seed)
    assert all(bool(x.ne(0).any()) for x in inputs if x.dtype != torch.bool)
    before = run_module(module, inputs)
    after = run_module(_reparse(module), inputs)
    declared = [v.type for v in module.function().regions[0].block.terminator.operands]
    for x, y, type_ in zip(before, after, declared, strict=True):
        assert x.dtype == y.dtype == type_.dtype.torch_dtype and tuple(x.shape) == type_.shape
        assert torch.equal(x, y) or (torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()))


def test_locations_from_unlocated_text_point_at_the_op_name():
    text = (
        '"func.func"() <{function_type = (f32) -> f32, sym_name = "main"}> ({\n'
        "^bb0(%arg0: f32):\n"
        '  %0 = "ft.neg"(%arg0) : (f32) -> f32\n'
        '    "func.return"(%0) : (f32) -> ()\n'
        "}) : () -> ()\n"
    )
    func = parse_module(text, "pos.ftir").functions[0]
    neg, ret = func.regions[0].block.ops
    assert func.location == Location("pos.ftir", 1, 1)
    assert neg.location == Location("pos.ftir", 3, 8)
    assert ret.location == Location("pos.ftir", 4, 5)


@whole_modules
@given(module=modules())
def test_clone_is_an_independent_equal_copy(module):
    copy = clone_module(module)
    assert structure(copy) == structure(module)
    assert copy.resources.keys() == module.resources.keys()
    assert all(copy.resources[k] is module.resources[k] for k in module.resources)
    assert {id(op) for op in copy.walk()}.isdisjoint(id(op) for op in module.walk())


@given(value=floats_with_edges())
def test_float_attributes_round_trip_bit_exactly(value):
    parsed = _only_op(_reparse(_module_with_op({"x": value, "nested": [value, {"y": value}]})))
    bits = struct.pack("<d", value)
    assert struct.pack("<d", parsed.attributes["x"]) == bits
    assert struct.pack("<d", parsed.attributes["nested"][0]) == bits
    assert struct.pack("<d", parsed.attributes["nested"][1]["y"]) == bits


@given(bits=st.integers(0, 2**64 - 1))
def test_every_f64_bit_pattern_round_trips(bits):
    """Including NaNs with payloads and signs, which Python arithmetic would not preserve."""
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    parsed = _only_op(_reparse(_module_with_op({"x": value}))).attributes["x"]
    assert struct.unpack("<Q", struct.pack("<d", parsed))[0] == bits


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "f8E4M3FN", "f8E5M2", "f8E8M0FNU", "f64", "i64", "i1"])
@given(data=st.data())
def test_dense_data_round_trips_bit_exactly(dtype, data):
    type_ = data.draw(tensor_types((dtype,), dynamic=False))
    value = data.draw(dense_values(type_))
    parsed = _only_op(_reparse(_module_with_op({"v": DenseAttr(value)}))).attributes["v"]
    assert attribute_key(parsed) == attribute_key(DenseAttr(value))
    assert parsed.value.dtype == value.dtype


def test_dense_splat_detection_respects_signed_zero_and_nan_payloads():
    """0.0 and -0.0 compare equal, and NaN != NaN: neither may collapse a dense into a splat wrongly."""
    for value in (torch.tensor([0.0, -0.0]), torch.tensor([0x7FC00000, 0x7FC00001], dtype=torch.int32).view(
            torch.float32)):
        parsed = _only_op(_reparse(_module_with_op({"v": DenseAttr(value)}))).attributes["v"]
        assert attribute_key(parsed) == attribute_key(DenseAttr(value))
        assert parsed == DenseAttr(value)
        assert parsed != DenseAttr(value.flip(0))


def test_empty_dense_tensors_use_mlir_empty_form():
    for shape in ((0,), (0, 3), (3, 0)):
        attr = DenseAttr(torch.zeros(shape))
        text = print_module(_module_with_op({"v": attr}))
        assert f"dense<> : tensor<{'x'.join(map(str, shape))}xf32>" in text
        assert _only_op(parse_module(text)).attributes["v"] == attr


@given(value=attribute_values())
def test_every_attribute_kind_round_trips(value):
    parsed = _only_op(_reparse(_module_with_op({"v": value}))).attributes["v"]
    assert attribute_key(parsed) == attribute_key(value)


@given(text=st.text())
def test_unicode_strings_round_trip_everywhere(text):
    """As an attribute value, an attribute name, a function name and inside locations."""
    key = text or "empty_key_is_not_mlir"
    location = Location(file=text or "f", line=1, col=2, name=text)
    module = _module_with_op({"s": text, key: [text]}, location)
    func = Operation("func.func", attributes={"sym_name": text}, regions=[Region([Block()])], location=location)
    func.regions[0].block.append(Operation("func.return", location=location))
    module.body.append(func)
    parsed = _reparse(module)
    op, parsed_func = parsed.body.ops
    assert op.attributes == {"s": text, key: [text]}
    assert parsed_func.attributes["sym_name"] == text
    assert op.location == parsed_func.location == location
    assert print_module(parsed, print_locations=True) == print_module(module, print_locations=True)


@given(location=locations())
def test_locations_round_trip(location):
    assert _only_op(_reparse(_module_with_op({}, location))).location == location


@given(type_=tensor_types())
def test_types_print_and_parse_back(type_):
    assert parse_type(str(type_)) == type_
    assert parse_type(str(type_.dtype)) == type_.dtype


def test_structure_tells_apart_what_equality_conflates():
    """The comparison the properties above rely on is not vacuous."""
    nan_a = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000))[0]
    nan_b = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert attribute_key(0.0) != attribute_key(-0.0)
    assert attribute_key(nan_a) == attribute_key(nan_a) != attribute_key(nan_b)
    assert attribute_key(1) != attribute_key(True) != attribute_key(1.0)
    assert attribute_key(DenseAttr(torch.tensor([0.0]))) != attribute_key(DenseAttr(torch.tensor([-0.0])))
    assert math.isnan(nan_a) and math.isnan(nan_b)
    a = _module_with_op({"x": 1.0}, Location("a.py", 1, 2))
    assert structure(a) != structure(_module_with_op({"x": 1.0}, Location("a.py", 1, 3)))
    assert structure(a, with_locations=False) == structure(_module_with_op({"x": 1.0}), with_locations=False)
    assert isinstance(parse_type("tensor<2x?xf32>"), TensorType)
