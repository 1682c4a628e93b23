"""Pass pipelines as text, and the named presets per optimization level.

Syntax (grammar in `pipeline.lark`), the vocabulary of mlir-opt:

    canonicalize,cse,fuse-x{opt=1}
    canonicalize{max-iterations=3 top-down=false}     options separated by spaces ...
    fold{max-elements=64,foo=[1,2]}                   ... or by commas

Option values are integers, floats (`1.5`, `1e-3`, `inf`), `true`/`false`, bare words
(`bf16`, `sm_90`), double-quoted strings, and lists `[1,2]`.  The presets `O0`..`O3` may
appear inside a pipeline and expand to their passes (`O1,fuse-x`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import lark
from lark import Tree

from flagtree.errors import OptionsError
from flagtree.passes.base import Pass, get_pass

_CLEANUP = ("canonicalize", "fold", "cse", "dce")
# Fusion passes run at O2 (the default level: users expect attention fused by default) and
# O3, between the cleanup that puts the graph in canonical form and the final canonicalize,
# which folds the reshapes and transposes a fusion leaves around its fused op
# (fuse-moe, fuse-norm, ... join as they land).
_FUSION_PASSES: tuple[str, ...] = ("fuse-attention",)
PRESETS: dict[str, str] = {
    "O0": "",
    "O1": "canonicalize,cse,dce",
    "O2": ",".join((*_CLEANUP, *_FUSION_PASSES, "canonicalize")),
    "O3": ",".join((*_CLEANUP, *_FUSION_PASSES, "canonicalize")),
}

# What each grammar terminal looks like, for "expected ..." messages.
_TERMINAL_NAMES = {
    "PASS_NAME": "a pass name",
    "OPTION_NAME": "an option name",
    "INT": "a value",
    "FLOAT": "a value",
    "BOOL": "a value",
    "WORD": "a value",
    "STRING": "a value",
    "LSQB": "a value",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "$END": "end of input",
}


def preset_pipeline(level: int) -> str:
    """The pipeline text of optimization level `level` (0-3); O0 runs no passes."""
    key = f"O{level}"
    if type(level) is not int or key not in PRESETS:
        raise OptionsError(f"optimization level {level!r} does not exist; valid levels: 0, 1, 2, 3")
    return PRESETS[key]


def parse_pipeline(text: str) -> list[Pass]:
    """The passes `text` names, presets expanded; raises OptionsError naming the column."""
    try:
        tree = _lark_parser().parse(text)
    except lark.UnexpectedInput as e:
        raise _syntax_error(text, e) from None
    passes: list[Pass] = []
    for element in tree.children:
        passes.extend(_build_element(text, element))
    return passes


@functools.cache
def _lark_parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "pipeline.lark").read_text()
    return lark.Lark(grammar, parser="lalr", maybe_placeholders=False)


def _syntax_error(text: str, error: lark.UnexpectedInput) -> OptionsError:
    if isinstance(error, lark.UnexpectedToken):
        found = "end of input" if error.token.type == "$END" else repr(str(error.token))
        column = len(text) + 1 if error.token.type == "$END" else error.column
        return _error(text, column, f"expected {_describe_expected(error.expected)}, found {found}")
    if isinstance(error, lark.UnexpectedCharacters):
        return _error(text, error.column, f"unexpected character {text[error.pos_in_stream]!r}; "
                                          f"expected {_describe_expected(error.allowed)}")
    return _error(text, len(text) + 1, f"unexpected end of input; expected {_describe_expected(error.expected)}")


def _describe_expected(terminals: set[str]) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, repr(t.lower())) for t in terminals})
    return " or ".join(names)


def _error(text: str, column: int, message: str) -> OptionsError:
    return OptionsError(f"pipeline '{text}', column {column}: {message}")


def _build_element(text: str, element: Tree) -> list[Pass]:
    name_token, *rest = element.children
    name = str(name_token)
    if name in PRESETS:
        if rest:
            raise _error(text, name_token.column, f"preset '{name}' takes no options")
        return parse_pipeline(PRESETS[name])
    try:
        pass_class = get_pass(name)
    except OptionsError as e:
        raise _error(text, name_token.column, f"{e}; presets: {', '.join(PRESETS)}") from None
    fields: dict[str, Any] = {}
    for option in rest[0].children if rest else []:
        field_name, value = _checked_option(text, pass_class, option)
        if field_name in fields:
            name_token = option.children[0]
            raise _error(text, name_token.column, f"option '{name_token}' is given twice")
        fields[field_name] = value
    try:
        return [pass_class(**fields)]
    except OptionsError as e:
        raise _error(text, name_token.column, str(e)) from None


def _checked_option(text: str, pass_class: type[Pass], option: Tree) -> tuple[str, Any]:
    name_token, value = option.children
    try:
        return pass_class.check_option(str(name_token), _value(value))
    except OptionsError as e:
        raise _error(text, name_token.column, str(e)) from None


def _value(node: Tree) -> Any:
    kind = node.data
    if kind == "list_value":
        return [_value(child) for child in node.children]
    (token,) = node.children
    if kind == "int_value":
        return int(token)
    if kind == "float_value":
        return float(token)
    if kind == "bool_value":
        return token == "true"
    if kind == "string_value":
        return re.sub(r"\\(.)", r"\1", str(token)[1:-1])
    return str(token)
