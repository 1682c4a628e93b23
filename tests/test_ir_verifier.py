"""Each verifier rule fires on a minimal module, and its message names the op, the op's
location (file:line:col) and the problem.

Cases mark the offending op with `‸` before its name (removed before parsing), so the
expected location comes from the input itself."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.errors import VerificationError
from flagtree.ir import Location, Module, Operation, TensorType, Value, parse_module, verify
from flagtree.ir.opdef import ELEMENTWISE, REDUCTION, lookup
from flagtree.ir.types import ScalarType
from tests.strategies import modules

whole_modules = settings(max_examples=25)  # examples that build a whole module are costly

MARK = "‸"
FILE = "verify.ftir"
T = "tensor<2x3xf32>"


def _func(body: str, args: str = f"%arg0: {T}", result: str = T, name: str = "main") -> str:
    arg_types = ", ".join(a.split(": ", 1)[1] for a in args.split(", ")) if args else ""
    return (
        f'"func.func"() <{{function_type = ({arg_types}) -> {result}, sym_name = "{name}"}}> ({{\n'
        f"^bb0({args}):\n{body}}}) : () -> ()\n"
    )


RETURN = f'  "func.return"(%0) : ({T}) -> ()\n'


def _one_op(op_text: str, **func_kwargs) -> str:
    return _func(f"  %0 = ‸{op_text}\n" + RETURN, **func_kwargs)


CASES = {
    "unknown_op": (
        _one_op(f'"ft.bogus"(%arg0) : ({T}) -> {T}'), "ft.bogus", ["unknown op", "docs/ops.md"]),
    "too_many_operands": (
        _one_op(f'"ft.exp"(%arg0, %arg0) : ({T}, {T}) -> {T}'), "ft.exp", ["expects 1 operands, has 2"]),
    "too_few_operands": (
        _one_op(f'"ft.add"(%arg0) : ({T}) -> {T}'), "ft.add", ["expects 2 operands, has 1"]),
    "too_many_results": (
        _func(f'  %0:2 = ‸"ft.exp"(%arg0) : ({T}) -> ({T}, {T})\n  "func.return"(%0#0) : ({T}) -> ()\n'),
        "ft.exp", ["expects 1 results, has 2"]),
    "unknown_attribute": (
        _one_op(f'"ft.softmax"(%arg0) {{dim = 1 : i64, axis = 1 : i64}} : ({T}) -> {T}'), "ft.softmax",
        ["unknown attribute 'axis'", "valid: dim"]),
    "missing_attribute": (
        _one_op(f'"ft.softmax"(%arg0) : ({T}) -> {T}'), "ft.softmax", ["requires attribute 'dim'"]),
    "float_for_int_attribute": (
        _one_op(f'"ft.softmax"(%arg0) {{dim = 1.0 : f64}} : ({T}) -> {T}'), "ft.softmax",
        ["attribute 'dim' must be int", "got 1.0"]),
    "bool_for_int_attribute": (
        _one_op(f'"ft.softmax"(%arg0) {{dim = true}} : ({T}) -> {T}'), "ft.softmax",
        ["attribute 'dim' must be int", "got True"]),
    "string_for_int_array_attribute": (
        _one_op(f'"ft.transpose"(%arg0) {{perm = "1, 0"}} : ({T}) -> {T}'),
        "ft.transpose", ["attribute 'perm' must be tuple"]),
    "result_type_mismatch": (
        _one_op(f'"ft.exp"(%arg0) : ({T}) -> tensor<2x3xf16>', result="tensor<2x3xf16>").replace(
            f'"func.return"(%0) : ({T})', '"func.return"(%0) : (tensor<2x3xf16>)'),
        "ft.exp", ["result #0 has type tensor<2x3xf16>", "the operands imply tensor<2x3xf32>"]),
    "result_shape_mismatch": (
        _one_op(f'"ft.sum"(%arg0) {{dims = array<i64: -1>, keepdim = false}} : ({T}) -> tensor<3xf32>',
                result="tensor<3xf32>").replace(f'"func.return"(%0) : ({T})', '"func.return"(%0) : (tensor<3xf32>)'),
        "ft.sum", ["result #0 has type tensor<3xf32>", "the operands imply tensor<2xf32>"]),
    "broadcast_failure": (
        _one_op(f'"ft.add"(%arg0, %arg1) : ({T}, tensor<4x3xf32>) -> {T}', args=f"%arg0: {T}, %arg1: tensor<4x3xf32>"),
        "ft.add", ["shapes [2, 3] and [4, 3] do not broadcast"]),
    "element_type_mismatch": (
        _one_op(f'"ft.mul"(%arg0, %arg1) : ({T}, tensor<2x3xbf16>) -> {T}',
                args=f"%arg0: {T}, %arg1: tensor<2x3xbf16>"),
        "ft.mul", ["operands must have one element type", "bf16, f32"]),
    "dim_out_of_range": (
        _one_op(f'"ft.softmax"(%arg0) {{dim = 2 : i64}} : ({T}) -> {T}'), "ft.softmax",
        ["dim 2 is out of range for rank 2"]),
    "terminator_not_last": (
        _func(f'  %0 = "ft.exp"(%arg0) : ({T}) -> {T}\n  ‸"func.return"(%0) : ({T}) -> ()\n' + RETURN),
        "func.return", ["is a terminator but is not last in its block"]),
    "yield_not_last_in_fusion": (
        _func(f'  %0 = "ft.fusion"(%arg0) ({{\n  ^bb0(%arg1: {T}):\n    ‸"ft.yield"(%arg1) : ({T}) -> ()\n'
              f'    %1 = "ft.exp"(%arg1) : ({T}) -> {T}\n    "ft.yield"(%1) : ({T}) -> ()\n  }}) : ({T}) -> {T}\n'
              + RETURN),
        "ft.yield", ["is a terminator but is not last in its block"]),
    "fusion_region_without_yield": (
        _func(f'  %0 = ‸"ft.fusion"(%arg0) ({{\n  ^bb0(%arg1: {T}):\n    %1 = "ft.exp"(%arg1) : ({T}) -> {T}\n'
              f'  }}) : ({T}) -> {T}\n' + RETURN),
        "ft.fusion", ["the region must end with ft.yield"]),
    "error_inside_a_fusion_region": (
        _func(f'  %0 = "ft.fusion"(%arg0) ({{\n  ^bb0(%arg1: {T}):\n'
              f'    %1 = ‸"ft.softmax"(%arg1) : ({T}) -> {T}\n    "ft.yield"(%1) : ({T}) -> ()\n  }}) : ({T}) -> {T}\n'
              + RETURN),
        "ft.softmax", ["requires attribute 'dim'"]),
    "fusion_region_reads_a_function_argument": (
        _func(f'  %0 = "ft.fusion"(%arg0) ({{\n  ^bb0(%arg1: {T}):\n'
              f'    %1 = ‸"ft.exp"(%arg0) : ({T}) -> {T}\n    "ft.yield"(%1) : ({T}) -> ()\n  }}) : ({T}) -> {T}\n'
              + RETURN),
        "ft.exp", [f"operand #0 is block argument #0 of 'func.func' at {FILE}:1:1",
                   f"defined outside the region of 'ft.fusion' at {FILE}:3:8",
                   "pass it as an operand of the ft.fusion"]),
    "fusion_region_reads_an_outer_result": (
        _func(f'  %0 = "ft.neg"(%arg0) : ({T}) -> {T}\n'
              f'  %1 = "ft.fusion"(%arg0) ({{\n  ^bb0(%arg1: {T}):\n'
              f'    %2 = ‸"ft.add"(%arg1, %0) : ({T}, {T}) -> {T}\n    "ft.yield"(%2) : ({T}) -> ()\n'
              f'  }}) : ({T}) -> {T}\n  "func.return"(%1) : ({T}) -> ()\n'),
        "ft.add", [f"operand #1 is result #0 of 'ft.neg' at {FILE}:3:8",
                   f"defined outside the region of 'ft.fusion' at {FILE}:4:8",
                   "pass it as an operand of the ft.fusion"]),
    "function_without_return": (
        MARK + _func(f'  %0 = "ft.exp"(%arg0) : ({T}) -> {T}\n', result="()"),
        "func.func", ["body must end with func.return"]),
    "duplicate_function_name": (
        _func(f'  %0 = "ft.exp"(%arg0) : ({T}) -> {T}\n' + RETURN)
        + MARK + _func(f'  %0 = "ft.neg"(%arg0) : ({T}) -> {T}\n' + RETURN),
        "func.func", ["redefines function @main"]),
    "op_outside_a_function": (
        f'%0 = {MARK}"ft.constant"() {{value = 1 : i64}} : () -> i64\n', "ft.constant",
        ["only func.func may appear at module level"]),
}


def _parse_marked(marked: str) -> tuple[Module, int, int]:
    index = marked.index(MARK)
    before = marked[:index]
    line, col = before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1
    return parse_module(marked.replace(MARK, "", 1), FILE), line, col


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_names_op_location_and_problem(name):
    marked, op_name, phrases = CASES[name]
    module, line, col = _parse_marked(marked)
    with pytest.raises(VerificationError) as info:
        verify(module)
    message = str(info.value)
    assert message.startswith(f"{FILE}:{line}:{col}: '{op_name}' op: "), message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} missing from: {message}"


def _three_op_function() -> Module:
    return parse_module(_func(
        f'  %0 = "ft.exp"(%arg0) : ({T}) -> {T}\n'
        f'  %1 = "ft.neg"(%0) : ({T}) -> {T}\n'
        f'  "func.return"(%1) : ({T}) -> ()\n'), FILE)


def test_use_before_def():
    """The parser cannot express it, but a pass that moves ops can: swap the producer and its user."""
    module = _three_op_function()
    ops = module.functions[0].regions[0].block.ops
    ops[0], ops[1] = ops[1], ops[0]
    with pytest.raises(VerificationError) as info:
        verify(module)
    assert str(info.value).startswith(f"{FILE}:4:8: 'ft.neg' op: operand #0 is used before it is defined")


def test_value_from_another_function():
    module = _three_op_function()
    other = parse_module(_func(f'  %0 = "ft.sin"(%arg0) : ({T}) -> {T}\n' + RETURN, name="other"), FILE)
    module.body.append(other.functions[0])
    foreign = module.functions[0].regions[0].block.args[0]
    other.functions[0].regions[0].block.ops[0].set_operand(0, foreign)
    with pytest.raises(VerificationError) as info:
        verify(module)
    assert str(info.value).startswith(f"{FILE}:3:8: 'ft.sin' op: operand #0 is used before it is defined (or "
                                      "defined in another scope)")


def _region_uses_of_arguments(module: Module) -> list[tuple[Operation, int, Value]]:
    """(op, operand index, outer value) for each use of an ft.fusion region argument, with the
    fusion operand that argument stands for: the value a non-isolated region would read directly."""
    return [
        (user, index, fusion.operands[arg.index])
        for fusion in module.walk() if fusion.name == "ft.fusion"
        for arg in fusion.regions[0].block.args for user, index in arg.uses
        if user.name != "ft.yield"
    ]


@whole_modules
@given(module=modules().filter(_region_uses_of_arguments), data=st.data())
def test_any_region_reading_an_outer_value_is_caught_at_the_reader(module, data):
    """Regions are isolated from above: reading the outer value instead of the region argument
    that carries it (same type, same data) is still an error, reported at the reading op."""
    op, index, outer = data.draw(st.sampled_from(_region_uses_of_arguments(module)))
    op.set_operand(index, outer)
    with pytest.raises(VerificationError) as info:
        verify(module)
    message = str(info.value)
    assert message.startswith(f"{op.location}: '{op.name}' op: operand #{index} is "), message
    assert "defined outside the region of 'ft.fusion'" in message, message
    assert "pass it as an operand of the ft.fusion" in message, message


def test_minimal_valid_module_verifies():
    verify(_three_op_function())


def _body_ops_with_inferred_types(module: Module) -> list:
    """Ops directly in function bodies whose result types follow from operands alone."""
    return [
        op for func in module.functions for op in func.regions[0].block.ops
        if lookup(op.name) and {ELEMENTWISE, REDUCTION} & lookup(op.name).traits and op.name != "ft.cast"
    ]


@whole_modules
@given(module=modules(), data=st.data())
def test_any_wrong_result_type_is_caught_at_its_op(module, data):
    candidates = _body_ops_with_inferred_types(module)
    if not candidates:
        return
    op = data.draw(st.sampled_from(candidates))
    result = op.results[0]
    if isinstance(result.type, TensorType):
        wrong = data.draw(st.sampled_from([
            TensorType((*result.type.shape, 7), result.type.dtype),
            result.type.with_dtype(ScalarType("f64")),
        ]))
    else:
        wrong = ScalarType("f64")
    result.type = wrong
    with pytest.raises(VerificationError) as info:
        verify(module)
    assert str(info.value).startswith(f"{op.location}: '{op.name}' op: "), str(info.value)


@whole_modules
@given(module=modules(), data=st.data())
def test_any_dropped_operand_is_caught_at_its_op(module, data):
    candidates = [
        op for func in module.functions for op in func.regions[0].block.ops
        if lookup(op.name) and lookup(op.name).operands[0] == lookup(op.name).operands[1] and op.operands
    ]
    if not candidates:
        return
    op = data.draw(st.sampled_from(candidates))
    op.drop_operands()
    with pytest.raises(VerificationError) as info:
        verify(module)
    assert str(info.value).startswith(f"{op.location}: '{op.name}' op: expects "), str(info.value)


def test_location_without_a_file_is_still_named():
    module = _three_op_function()
    op = module.functions[0].regions[0].block.ops[1]
    op.location = Location(name="aten.neg from model.py:12")
    op.attributes["bogus"] = 1
    with pytest.raises(VerificationError, match=r"^aten\.neg from model\.py:12: 'ft\.neg' op: unknown attribute"):
        verify(module)
