"""Parse FTIR text (MLIR generic op form) with the lark grammar in `ftir.lark`."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lark
from lark import Token, Tree

from flagtree.errors import SourceError
from flagtree.ir.attributes import FloatBits, ResourceAttr, dense_from_literal, float_from_bits, unescape_string
from flagtree.ir.core import Block, Location, Module, Operation, Region, Value
from flagtree.ir.printer import function_type
from flagtree.ir.types import FunctionType, ScalarType, TensorType, Type, parse_type

# What each grammar terminal looks like, for "expected ..." messages.
_TERMINAL_NAMES = {
    "RESULT_NAME": "a result name (%0 =)",
    "VALUE_REF": "an SSA value (%name)",
    "BLOCK_ID": "a block label (^bb0)",
    "ELEM_TYPE": "an element type (f32, bf16, i64, ...)",
    "TENSOR_TYPE": "a tensor type (tensor<2x?xf32>)",
    "BARE_ID": "a name (letters, digits, _ $ ., or a string)",
    "STRING": "a string (an op name such as \"ft.add\")",
    "INT": "an integer",
    "FLOAT": "a float",
    "HEX": "a hexadecimal literal",
    "DENSE_BOOL": "true/false",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LESSTHAN": "'<'",
    "MORETHAN": "'>'",
    "COLON": "':'",
    "COMMA": "','",
    "EQUAL": "'='",
    "__ANON_0": "'->'",
    "$END": "end of input",
}


@functools.cache
def _lark_parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "ftir.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, repr(t.lower()) if t.isupper() else t) for t in expected})
    return " or ".join(names) if len(names) <= 4 else ", ".join(names[:4]) + ", ..."


def parse_module(text: str, filename: str = "<string>") -> Module:
    """Parse FTIR text into a Module; raises SourceError naming file:line:col."""
    try:
        tree = _lark_parser().parse(text)
    except lark.UnexpectedToken as e:
        # LALR's expected set merges states (it lists tokens of unrelated contexts); replaying
        # the parser gives exactly the tokens that could continue the input.
        acceptable = e.interactive_parser.accepts() if e.interactive_parser is not None else e.expected
        expected = f"expected {_describe_expected(acceptable)}"
        if e.token.type == "$END":
            raise SourceError(f"{expected}, found end of input", filename, *_end_position(text)) from None
        raise SourceError(f"{expected}, found {str(e.token)!r}", filename, e.line, e.column) from None
    except lark.UnexpectedCharacters as e:
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        if char == '"':
            raise SourceError("unterminated string: expected a closing '\"' on the same line", filename, e.line,
                              e.column) from None
        allowed = _describe_expected(e.allowed) if e.allowed else "a token"
        raise SourceError(f"unexpected character {char!r}; expected {allowed}", filename, e.line, e.column) from None
    except lark.UnexpectedEOF as e:
        raise SourceError(f"unexpected end of input; expected {_describe_expected(set(e.expected))}", filename,
                          *_end_position(text)) from None
    return _Builder(filename).build(tree)


def _end_position(text: str) -> tuple[int, int]:
    """Line and column just past the last non-blank character: where truncated input stops."""
    content = text.rstrip()
    return content.count("\n") + 1, len(content) - (content.rfind("\n") + 1) + 1


def parse_file(path: str | Path) -> Module:
    path = Path(path)
    return parse_module(path.read_text(), str(path))


_TENSOR_DIMS_PREFIX = re.compile(r"tensor<(?:(?:\d+|\?)x)*")


class _Scope:
    def __init__(self, parent: _Scope | None):
        self.parent = parent
        self.values: dict[str, list[Value]] = {}

    def lookup(self, name: str) -> list[Value] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        return None


class _Builder:
    def __init__(self, filename: str):
        self.filename = filename

    def error(self, message: str, where: Tree | Token) -> SourceError:
        if isinstance(where, Token):
            return SourceError(message, self.filename, where.line, where.column)
        return SourceError(message, self.filename, where.meta.line, where.meta.column)

    def build(self, tree: Tree) -> Module:
        scope = _Scope(None)
        ops = [self.operation(child, scope) for child in tree.children]
        if len(ops) == 1 and ops[0].name == "builtin.module":
            return Module(ops[0])
        module = Module.empty()
        for op in ops:
            module.body.append(op)
        return module

    # ops ---------------------------------------------------------------
    def operation(self, tree: Tree, scope: _Scope) -> Operation:
        result_tok, name_tok, *rest = tree.children
        operand_toks = []
        props = regions = attrs = loc_tree = None
        sig = None
        for child in rest:
            if isinstance(child, Token) and child.type == "VALUE_REF":
                operand_toks.append(child)
            elif child is None:
                continue
            elif child.data == "properties":
                props = child
            elif child.data == "regions":
                regions = child
            elif child.data == "attr_dict":
                attrs = child
            elif child.data == "function_type":
                sig = child
            elif child.data == "location":
                loc_tree = child
        name = self.string(name_tok)
        signature = self.function_type(sig)
        location = self.location(loc_tree) if loc_tree is not None else Location(
            self.filename, name_tok.line, name_tok.column)
        if len(operand_toks) != len(signature.inputs):
            raise self.error(
                f"'{name}' has {len(operand_toks)} operands but its type lists {len(signature.inputs)}", name_tok)
        operands = []
        for index, (tok, declared) in enumerate(zip(operand_toks, signature.inputs)):
            value = self.lookup(tok, scope)
            if value.type != declared:
                raise self.error(
                    f"operand #{index} of '{name}' ({tok}) has type {value.type}, but the op's type says {declared}",
                    tok)
            operands.append(value)
        attributes = {}
        if props is not None:
            attributes.update(self.attr_dict(props.children[0]))
        if attrs is not None:
            attributes.update(self.attr_dict(attrs))
        declared_fn_type = attributes.pop("function_type", None) if name == "func.func" else None
        op = Operation(name, operands, list(signature.results), attributes, location=location)
        if regions is not None:
            isolated = name in ("func.func", "builtin.module")
            for region_tree in regions.children:
                op.add_region(self.region(region_tree, _Scope(None if isolated else scope)))
        if declared_fn_type is not None:
            self.check_function_type(op, declared_fn_type, name_tok)
        self.define_results(result_tok, op, scope)
        return op

    def check_function_type(self, func: Operation, declared: FunctionType, where: Token) -> None:
        if not func.regions:
            raise self.error("'func.func' needs a body region", where)
        actual = function_type(func)
        if actual != declared:
            raise self.error(f"function_type {declared} does not match the body's arguments and return {actual}",
                             where)

    def define_results(self, tok: Token | None, op: Operation, scope: _Scope) -> None:
        if tok is None:
            if op.results:
                raise self.error(f"'{op.name}' returns {len(op.results)} values but names none", op_tree_pos(op))
            return
        text = str(tok)
        name, _, count = text.partition(":")
        expected = int(count) if count else 1
        if expected != len(op.results):
            raise self.error(f"{text} names {expected} results but '{op.name}' has {len(op.results)}", tok)
        if scope.lookup(name) is not None:
            raise self.error(f"{name} is defined twice", tok)
        scope.values[name] = list(op.results)

    def lookup(self, tok: Token, scope: _Scope) -> Value:
        name, _, index = str(tok).partition("#")
        values = scope.lookup(name)
        if values is None:
            raise self.error(f"use of undefined value {name}", tok)
        if not index and len(values) != 1:
            raise self.error(f"{name} has {len(values)} results; write {name}#0 .. {name}#{len(values) - 1}", tok)
        i = int(index or 0)
        if i >= len(values):
            raise self.error(f"{name} has {len(values)} results; #{i} is out of range", tok)
        return values[i]

    def region(self, tree: Tree, scope: _Scope) -> Region:
        block = Block()
        for child in tree.children:
            if child is None:
                continue
            if child.data == "block_label":
                for arg in child.children[1:]:
                    if arg is None:
                        continue
                    tok, type_tree = arg.children
                    name = str(tok)
                    if scope.lookup(name) is not None and name in scope.values:
                        raise self.error(f"{name} is defined twice", tok)
                    scope.values[name] = [block.add_argument(self.type(type_tree))]
            else:
                block.append(self.operation(child, scope))
        return Region([block])

    # attributes ----------------------------------------------------------
    def attr_dict(self, tree: Tree) -> dict:
        out = {}
        for entry in tree.children:
            if entry is None:
                continue
            name_tree, value_tree = entry.children
            key = self.name(name_tree)
            if key in out:
                raise self.error(f"attribute '{key}' appears twice", name_tree.children[0])
            out[key] = None if value_tree is None else self.attr_value(value_tree)
        return out

    def attr_value(self, tree: Tree):
        if isinstance(tree, Token):
            raise self.error(f"unexpected {tree!s}", tree)
        kind = tree.data
        if kind == "number":
            return self.number(tree)
        if kind == "string_attr":
            return self.string(tree.children[0])
        if kind == "true_attr":
            return True
        if kind == "false_attr":
            return False
        if kind == "unit_attr":
            return None
        if kind == "list_attr":
            return [self.attr_value(c) for c in tree.children if c is not None]
        if kind == "attr_dict":
            return self.attr_dict(tree)
        if kind == "int_array_attr":
            elem, *values = tree.children
            if str(elem) != "i64":
                raise self.error(f"only array<i64: ...> is supported, not array<{elem}>", elem)
            return tuple(int(v) for v in values if v is not None)
        if kind == "dense_attr":
            literal, type_tree = tree.children
            type_ = self.type(type_tree)
            if not isinstance(type_, TensorType) or not type_.is_static:
                raise self.error(f"dense attribute needs a static tensor type, not {type_}", tree)
            try:
                return dense_from_literal(self.dense_literal(literal, type_.dtype), type_)
            except (ValueError, RuntimeError) as e:
                raise self.error(str(e), tree) from None
        if kind == "resource_attr":
            name_tree, type_tree = tree.children
            type_ = self.type(type_tree)
            if not isinstance(type_, TensorType):
                raise self.error(f"dense_resource needs a tensor type, not {type_}", tree)
            try:
                return ResourceAttr(self.name(name_tree), type_)
            except ValueError as e:
                raise self.error(str(e), name_tree.children[0]) from None
        if kind == "type_attr":
            child = tree.children[0]
            return self.function_type(child) if child.data == "function_type" else self.type(child)
        raise self.error(f"unsupported attribute form '{kind}'", tree)

    def name(self, tree: Tree) -> str:
        """An attribute name or resource handle: a bare identifier or a string literal."""
        (tok,) = tree.children
        return self.string(tok) if tok.type == "STRING" else str(tok)

    def string(self, tok: Token) -> str:
        try:
            return unescape_string(str(tok))
        except ValueError as e:
            raise self.error(f"bad string literal {tok}: {e}", tok) from None

    def number(self, tree: Tree):
        tok, type_tree = tree.children
        type_ = self.type(type_tree) if type_tree is not None else None
        if type_ is not None and not isinstance(type_, ScalarType):
            raise self.error(f"a number's type must be a scalar type, not {type_}", tok)
        if tok.type == "FLOAT":
            if type_ is not None and not type_.is_float:
                raise self.error(f"float literal {tok} with integer type {type_}", tok)
            return float(str(tok))
        value = int(str(tok), 16) if tok.type == "HEX" else int(str(tok))
        if type_ is not None and type_.is_float:
            if tok.type != "HEX":
                raise self.error(f"integer literal {tok} with float type {type_}; write {tok}.0", tok)
            if value >= 1 << type_.bitwidth or type_.name == "f4E2M1FN":
                raise self.error(f"hex literal {tok} is not a {type_} bit pattern", tok)
            return float_from_bits(value, type_.name)
        width = 64 if type_ is None else type_.bitwidth
        low = 0 if type_ is not None and type_.name.startswith("ui") else -(1 << (width - 1))
        if not low <= value < 1 << width:  # signless integers take either signed or unsigned values, as in MLIR
            raise self.error(f"integer {tok} is out of range for {type_ or 'i64'}", tok)
        if type_ is not None and type_.name == "i1":
            return bool(value)
        return value

    def dense_literal(self, tree: Tree | None, dtype: ScalarType):
        if tree is None:  # `dense<>`
            return None
        if tree.data == "dense_list":
            return [self.dense_literal(c, dtype) for c in tree.children if c is not None]
        tok = tree.children[0]
        # The element kinds MLIR accepts for each element type; anything else is an error, not a conversion.
        if tok.type == "DENSE_BOOL" and dtype.name != "i1":
            raise self.error(f"{tok} is not a {dtype} element (true/false are i1 values)", tok)
        if tok.type == "FLOAT" and not dtype.is_float:
            raise self.error(f"float literal {tok} in a dense of integer type {dtype}", tok)
        if tok.type == "INT" and dtype.is_float:
            raise self.error(f"integer literal {tok} in a dense of float type {dtype}; write {tok}.0", tok)
        if tok.type == "DENSE_BOOL":
            return str(tok) == "true"
        if tok.type == "HEX":
            return FloatBits(int(str(tok), 16)) if dtype.is_float else int(str(tok), 16)
        return float(str(tok)) if tok.type == "FLOAT" else int(str(tok))

    # types ---------------------------------------------------------------
    def type(self, tree: Tree) -> Type:
        tok = tree.children[0]
        try:
            return parse_type(str(tok))
        except ValueError as e:
            # Point past the well-formed dims, at the element type (or whatever stands in its place).
            offset = _TENSOR_DIMS_PREFIX.match(str(tok)).end() if str(tok).startswith("tensor<") else 0
            raise SourceError(str(e), self.filename, tok.line, tok.column + offset) from None

    def function_type(self, tree: Tree) -> FunctionType:
        inputs, results = tree.children
        return FunctionType(self.type_list(inputs), self.type_list(results) if results.data == "type_list"
                            else (self.type(results),))

    def type_list(self, tree: Tree) -> tuple[Type, ...]:
        return tuple(self.type(c) for c in tree.children if c is not None)

    def location(self, tree: Tree) -> Location:
        body = tree.children[0]
        kids = body.children
        if body.data == "loc_unknown":
            return Location()
        if body.data == "loc_name":
            return Location(name=self.string(kids[0]))
        if body.data == "loc_file":
            return Location(self.string(kids[0]), int(kids[1]), int(kids[2]))
        return Location(self.string(kids[1]), int(kids[2]), int(kids[3]), self.string(kids[0]))


def op_tree_pos(op: Operation) -> Token:
    return Token("STRING", op.name, line=op.location.line, column=op.location.col)


def clone_module(module: Module) -> Module:
    """A deep copy (through the text form, locations included); resources are shared."""
    from flagtree.ir.printer import print_module

    copy = parse_module(print_module(module, print_locations=True))
    copy.resources = dict(module.resources)
    return copy
