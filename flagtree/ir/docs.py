"""Generate docs/ops.md, the FTIR op set reference, from the op definitions.

`python -m flagtree.ir.docs > docs/ops.md` regenerates it; a test fails when the file is
out of date, so the table always says what the code does.
"""

from __future__ import annotations

from flagtree.ir.attributes import DenseAttr, ResourceAttr
from flagtree.ir.opdef import COMMUTATIVE, ELEMENTWISE, FUSED, PURE, REDUCTION, SHAPE, TERMINATOR, OpDef, all_ops

_KIND_NAMES = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    tuple: "int array",
    list: "array",
    dict: "dictionary",
    DenseAttr: "dense",
    ResourceAttr: "dense_resource",
}

_TRAIT_MEANINGS = {
    PURE: "no side effects: CSE may merge it, DCE may drop it",
    ELEMENTWISE: "result element i depends only on operand elements i (NumPy broadcasting)",
    COMMUTATIVE: "the two operands may be swapped",
    REDUCTION: "reduces over dimensions",
    SHAPE: "moves or views data without arithmetic",
    TERMINATOR: "must be the last op of its block",
    FUSED: "produced by a fusion pass; compile reports count it",
}

_HEADER = """\
# FTIR op set

Generated from the op definitions in `flagtree/ir/ops/` by `python -m flagtree.ir.docs`;
do not edit by hand (`tests/test_ops_reference.py` fails when this file is out of date).

Every op is written in MLIR's generic form, for example
`%1 = "ft.softmax"(%0) {dim = -1 : i64} : (tensor<4x64xf32>) -> tensor<4x64xf32>`.
Operands broadcast with NumPy rules where an op is elementwise. Sized ops take their
output shape from the result type, with one `i64` operand per dynamic (`?`) result dim.
Each op's `reference` implementation (eager torch) defines its semantics; the reference
backend runs it and `tests/test_ops_reference.py` checks it against float64 torch.
"""


def _count(bounds: tuple[int, int | None]) -> str:
    low, high = bounds
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}–{high}"


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, newlines as <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _attributes(opdef: OpDef) -> str:
    entries = []
    for name, spec in opdef.attrs.items():
        kinds = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in spec.kinds)
        optional = ", optional" if not spec.required else ""
        entries.append(f"`{name}` ({kinds}{optional}): {spec.doc}")
    return "<br>".join(_cell(e) for e in entries) or "—"


def _operands(opdef: OpDef) -> str:
    count = _count(opdef.operands)
    return _cell(f"{count}: {opdef.operand_doc}" if opdef.operand_doc else count)


def _row(opdef: OpDef) -> str:
    traits = ", ".join(sorted(opdef.traits)) or "—"
    cells = [f"`{opdef.name}`", _operands(opdef), _count(opdef.results), _attributes(opdef), traits,
             _cell(opdef.summary)]
    return "| " + " | ".join(cells) + " |"


def ops_markdown() -> str:
    """The text of docs/ops.md: one table row per registered op, then the trait legend."""
    lines = [
        _HEADER,
        "| Op | Operands | Results | Attributes | Traits | Summary |",
        "|----|----------|---------|------------|--------|---------|",
        *(_row(opdef) for opdef in all_ops()),
        "",
        "## Traits",
        "",
        *(f"- `{trait}`: {meaning}" for trait, meaning in _TRAIT_MEANINGS.items()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(ops_markdown(), end="")
