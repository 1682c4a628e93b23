"""Print FTIR in MLIR's generic op form.

Values are renumbered on every print (`%argN` for block arguments, `%N` for results,
`%N:k` / `%N#i` for multi-result ops), so print(parse(text)) == text for printed text.
"""

from __future__ import annotations

from flagtree.ir.attributes import escape_string, format_attr_dict, format_attribute
from flagtree.ir.core import Block, Location, Module, Operation, Value
from flagtree.ir.types import FunctionType

# Attributes MLIR treats as inherent properties of registered ops (printed in `<{...}>`).
INHERENT_ATTRIBUTES = {"func.func": ("function_type", "sym_name")}


def function_type(func: Operation) -> FunctionType:
    """The signature of a `func.func`, derived from its block arguments and its return."""
    block = func.regions[0].block
    ret = block.terminator
    results = tuple(v.type for v in ret.operands) if ret is not None and ret.name == "func.return" else ()
    return FunctionType(tuple(a.type for a in block.args), results)


def format_location(loc: Location) -> str:
    if loc.file:
        pos = f"{escape_string(loc.file)}:{loc.line}:{loc.col}"
        return f"loc({escape_string(loc.name)}({pos}))" if loc.name else f"loc({pos})"
    if loc.name:
        return f"loc({escape_string(loc.name)})"
    return "loc(unknown)"


class _Printer:
    def __init__(self, print_locations: bool, strict: bool = True):
        self.print_locations = print_locations
        self.strict = strict
        self.names: dict[int, str] = {}
        self.next_result = 0
        self.next_arg = 0
        self.lines: list[str] = []

    def name(self, value: Value) -> str:
        try:
            return self.names[id(value)]
        except KeyError:
            if not self.strict:
                return "%<outside>"
            raise ValueError(f"value {value!r} is used but not defined before its use") from None

    def print_op(self, op: Operation, indent: int) -> None:
        if op.name == "func.func":
            self.next_result = 0
            self.next_arg = 0
        pad = "  " * indent
        head = ""
        if op.results:
            base = f"%{self.next_result}"
            self.next_result += 1
            if len(op.results) == 1:
                self.names[id(op.results[0])] = base
                head = f"{base} = "
            else:
                for i, r in enumerate(op.results):
                    self.names[id(r)] = f"{base}#{i}"
                head = f"{base}:{len(op.results)} = "
        operands = ", ".join(self.name(v) for v in op.operands)
        attrs = dict(op.attributes)
        inherent_keys = INHERENT_ATTRIBUTES.get(op.name, ())
        props = {k: attrs.pop(k) for k in inherent_keys if k in attrs}
        if op.name == "func.func":
            props["function_type"] = function_type(op)
        text = f'{pad}{head}"{op.name}"({operands})'
        if props:
            text += " <" + format_attr_dict(props) + ">"
        if not op.regions:
            self.lines.append(text + self.trailer(op, attrs))
            return
        self.lines.append(text + " (")
        for r_index, region in enumerate(op.regions):
            if r_index:
                self.lines[-1] += ", "
            self.lines[-1] += "{"
            for block in region.blocks:
                self.print_block(block, indent, label=op.name != "builtin.module")
            self.lines.append(pad + "}")
        self.lines[-1] += ")" + self.trailer(op, attrs)

    def trailer(self, op: Operation, attrs: dict) -> str:
        text = ""
        if attrs:
            text += " " + format_attr_dict(attrs)
        text += " : " + str(FunctionType(tuple(v.type for v in op.operands), tuple(op.result_types)))
        if self.print_locations:
            text += " " + format_location(op.location)
        return text

    def print_block(self, block: Block, indent: int, label: bool) -> None:
        if label:
            args = []
            for arg in block.args:
                name = f"%arg{self.next_arg}"
                self.next_arg += 1
                self.names[id(arg)] = name
                args.append(f"{name}: {arg.type}")
            self.lines.append("  " * indent + "^bb0(" + ", ".join(args) + "):" if args else "  " * indent + "^bb0:")
        for op in block.ops:
            self.print_op(op, indent + 1)


def print_op(op: Operation, print_locations: bool = False) -> str:
    """The generic-form text of one op (and everything nested in it).

    Values defined outside `op` print as `%<outside>`; use it for messages, not files.
    """
    printer = _Printer(print_locations, strict=False)
    printer.print_op(op, 0)
    return "\n".join(printer.lines)


def print_module(module: Module, print_locations: bool = False) -> str:
    """The module's text, ending in a newline."""
    printer = _Printer(print_locations)
    printer.print_op(module.op, 0)
    return "\n".join(printer.lines) + "\n"


__all__ = ["format_attribute", "format_location", "function_type", "print_module", "print_op"]
