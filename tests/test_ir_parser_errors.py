"""Malformed FTIR text raises SourceError at the right file:line:col, saying what was
expected and what was found.

Each case marks the position the error must point at with `‸` (removed before parsing),
so the expected line and column come from the input itself, not from the parser."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.errors import SourceError
from flagtree.ir import parse_module, print_module
from tests.strategies import modules

whole_modules = settings(max_examples=25)  # examples that build a whole module are costly

MARK = "‸"
FILE = "bad.ftir"


def _func(body: str, signature: str = "(tensor<2xf32>) -> tensor<2xf32>", args: str = "%arg0: tensor<2xf32>") -> str:
    return (
        f'"func.func"() <{{function_type = {signature}, sym_name = "main"}}> ({{\n'
        f"^bb0({args}):\n"
        f"{body}"
        "}) : () -> ()\n"
    )


RETURN = '  "func.return"(%0) : (tensor<2xf32>) -> ()\n'
EXP = '  %0 = "ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n'
SORT = '  %1:2 = "ft.sort"(%arg0) {descending = false, dim = 0 : i64, stable = true} : ' \
       "(tensor<2xf32>) -> (tensor<2xf32>, tensor<2xi64>)\n"


def _constant(literal: str) -> str:
    return _func(f'  %0 = "ft.constant"() {{value = {literal}}} : () -> tensor<2xf32>\n' + RETURN)


CASES = {
    "missing_paren": (
        _func('  %0 = "ft.exp"(%arg0 ‸: (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["expected ')' or ','", "found ':'"],
    ),
    "missing_paren_in_signature": (
        _func('  %0 = "ft.exp"(%arg0) : (tensor<2xf32> ‸-> tensor<2xf32>\n' + RETURN),
        ["expected ')' or ','", "found '->'"],
    ),
    "malformed_tensor_type": (
        _func('  %0 = "ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2x‸>\n' + RETURN),
        ["'tensor<2x>' is not an FTIR type", "expected e.g. f32 or tensor<2x?xbf16>"],
    ),
    "unknown_element_type_in_tensor": (
        _func('  %0 = "ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2x‸f17>\n' + RETURN),
        ["unknown element type 'f17'", "valid: ", "bf16", "f8E4M3FN"],
    ),
    "unknown_scalar_type": (
        _func('  %0 = "ft.exp"(%arg0) : (‸f17) -> tensor<2xf32>\n' + RETURN),
        ["expected", "an element type (f32, bf16, i64, ...)", "found 'f17'"],
    ),
    "undefined_value": (
        _func('  %0 = "ft.exp"(‸%x) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["use of undefined value %x"],
    ),
    "value_from_a_later_line": (
        _func('  %0 = "ft.neg"(‸%1) : (tensor<2xf32>) -> tensor<2xf32>\n'
              '  %1 = "ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["use of undefined value %1"],
    ),
    "redefined_value": (
        _func(EXP + '  ‸%0 = "ft.neg"(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["%0 is defined twice"],
    ),
    "redefined_block_argument": (
        _func(EXP + RETURN, "(tensor<2xf32>, tensor<2xf32>) -> tensor<2xf32>",
              "%arg0: tensor<2xf32>, ‸%arg0: tensor<2xf32>"),
        ["%arg0 is defined twice"],
    ),
    "operand_type_mismatch": (
        _func('  %0 = "ft.exp"(‸%arg0) : (tensor<3xf32>) -> tensor<2xf32>\n' + RETURN),
        ["operand #0 of 'ft.exp' (%arg0) has type tensor<2xf32>", "the op's type says tensor<3xf32>"],
    ),
    "operand_count_differs_from_signature": (
        _func('  %0 = ‸"ft.exp"(%arg0, %arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["'ft.exp' has 2 operands but its type lists 1"],
    ),
    "too_many_result_names": (
        _func('  ‸%0:2 = "ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["%0:2 names 2 results but 'ft.exp' has 1"],
    ),
    "too_few_result_names": (
        _func('  ‸%0 = "ft.sort"(%arg0) {descending = false, dim = 0 : i64, stable = true} : '
              "(tensor<2xf32>) -> (tensor<2xf32>, tensor<2xi64>)\n" + RETURN),
        ["%0 names 1 results but 'ft.sort' has 2"],
    ),
    "results_without_a_name": (
        _func('  ‸"ft.exp"(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["'ft.exp' returns 1 values but names none"],
    ),
    "multi_result_used_without_index": (
        _func(SORT + '  %0 = "ft.neg"(‸%1) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["%1 has 2 results; write %1#0 .. %1#1"],
    ),
    "result_index_out_of_range": (
        _func(SORT + '  %0 = "ft.neg"(‸%1#2) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["%1 has 2 results; #2 is out of range"],
    ),
    "dense_literal_longer_than_its_type": (
        _constant("‸dense<[1.0, 2.0, 3.0]> : tensor<2xf32>"),
        ["dense literal has shape [3] but its type is tensor<2xf32>"],
    ),
    "dense_literal_of_wrong_rank": (
        _constant("‸dense<[[1.0, 2.0]]> : tensor<2xf32>"),
        ["dense literal has shape [1, 2] but its type is tensor<2xf32>"],
    ),
    "ragged_dense_literal": (
        _constant("‸dense<[[1.0], [2.0, 3.0]]> : tensor<2x1xf32>"),
        ["dense literal cannot be read as f32 values"],
    ),
    "integer_in_float_dense": (
        _constant("dense<[1.0, ‸2]> : tensor<2xf32>"),
        ["integer literal 2 in a dense of float type f32", "write 2.0"],
    ),
    "float_in_integer_dense": (
        _constant("dense<‸1.5> : tensor<2xi64>"),
        ["float literal 1.5 in a dense of integer type i64"],
    ),
    "bool_in_float_dense": (
        _constant("dense<‸true> : tensor<2xf32>"),
        ["true is not a f32 element"],
    ),
    "dense_value_out_of_range": (
        _constant("‸dense<300> : tensor<2xi8>"),
        ["out of range for i8"],
    ),
    "dense_with_dynamic_type": (
        _constant("‸dense<1.0> : tensor<?xf32>"),
        ["dense attribute needs a static tensor type, not tensor<?xf32>"],
    ),
    "duplicate_attribute": (
        _func('  %0 = "ft.softmax"(%arg0) {dim = 0 : i64, ‸dim = 1 : i64} : (tensor<2xf32>) -> tensor<2xf32>\n'
              + RETURN),
        ["attribute 'dim' appears twice"],
    ),
    "integer_literal_with_float_type": (
        _func('  %0 = "ft.clamp"(%arg0) {min = ‸1 : f32} : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["integer literal 1 with float type f32", "write 1.0"],
    ),
    "integer_out_of_range": (
        _func('  %0 = "ft.softmax"(%arg0) {dim = ‸99999999999999999999 : i64} : (tensor<2xf32>) -> tensor<2xf32>\n'
              + RETURN),
        ["integer 99999999999999999999 is out of range for i64"],
    ),
    "bad_string_escape": (
        _func('  %0 = "ft.gelu"(%arg0) {approximate = ‸"\\zz"} : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["bad string literal", "is not an escape"],
    ),
    "unterminated_string": (
        _func('  %0 = ‸"ft.exp(%arg0) : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["unterminated string", "expected a closing '\"'"],
    ),
    "unexpected_character": (
        _func('  %0 = "ft.exp"(%arg0) ‸@ : (tensor<2xf32>) -> tensor<2xf32>\n' + RETURN),
        ["unexpected character '@'", "expected", "':'"],
    ),
    "function_type_disagrees_with_body": (
        "‸" + _func(EXP + RETURN, signature="(tensor<2xf32>) -> tensor<3xf32>"),
        ["function_type (tensor<2xf32>) -> tensor<3xf32> does not match", "(tensor<2xf32>) -> tensor<2xf32>"],
    ),
    "truncated_file": (
        _func(EXP).split('"ft.exp"')[0] + '"ft.exp"(%arg0) : (tensor<2xf32>) ->‸ ',
        ["expected", "found end of input"],
    ),
    "truncated_after_an_op": (
        _func(EXP + RETURN).rsplit("}", 1)[0].rstrip() + "‸\n\n",
        ["expected", "'}'", "found end of input"],
    ),
}


def _locate(marked: str) -> tuple[str, int, int]:
    """The text without its marker, and the marker's 1-based line and column."""
    index = marked.index(MARK)
    before = marked[:index]
    return marked.replace(MARK, "", 1), before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_names_position_expected_and_found(name):
    marked, phrases = CASES[name]
    text, line, col = _locate(marked)
    with pytest.raises(SourceError) as info:
        parse_module(text, FILE)
    error = info.value
    assert (error.file, error.line, error.col) == (FILE, line, col), str(error)
    assert str(error) == f"{FILE}:{line}:{col}: error: {error.message}"
    for phrase in phrases:
        assert phrase in error.message, f"{phrase!r} missing from: {error.message}"


def test_every_case_is_well_formed_without_its_defect():
    """Sanity check of the fixtures: the shared scaffolding parses when nothing is broken."""
    parse_module(_func(EXP + RETURN), FILE)
    parse_module(_func(SORT + EXP + RETURN), FILE)
    parse_module(_constant("dense<[1.0, 2.0]> : tensor<2xf32>"), FILE)


@whole_modules
@given(module=modules(max_ops=4), data=st.data())
def test_any_truncation_is_a_source_error_at_the_end(module, data):
    text = print_module(module).rstrip()
    cut = data.draw(st.integers(0, len(text) - 1))
    prefix = text[:cut]
    if not prefix.strip():
        return  # empty input is an empty module
    with pytest.raises(SourceError) as info:
        parse_module(prefix, FILE)
    lines = prefix.splitlines() or [""]
    assert 1 <= info.value.line <= len(lines)
    assert 1 <= info.value.col <= len(lines[info.value.line - 1]) + 1


@whole_modules
@given(module=modules(max_ops=4), data=st.data())
def test_corrupted_text_fails_only_with_source_errors(module, data):
    """Deleting or inserting one character never crashes the parser with another exception."""
    text = print_module(module, print_locations=data.draw(st.booleans()))
    at = data.draw(st.integers(0, len(text) - 1))
    insert = data.draw(st.sampled_from(['"', "\\", "%", "#", ":", "(", ")", "{", "}", "<", ">", "x", "?", "0", "-",
                                        ".", "e", "@", "^", "é", ""]))
    corrupted = text[:at] + insert + text[at + (insert == ""):]
    try:
        parse_module(corrupted, FILE)
    except SourceError as error:
        assert error.line >= 1 and error.col >= 1
