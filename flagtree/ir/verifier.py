"""Check FTIR invariants; every error names the op, its location and what is wrong.

Every region is isolated from above: its ops read only the region's block arguments and
values defined inside it.  The executors and code generators run a region (an ft.fusion
kernel) on its arguments alone, so a value captured from outside would have no binding.
"""

from __future__ import annotations

from flagtree.errors import VerificationError
from flagtree.ir.core import Block, BlockArgument, Module, Operation, Value
from flagtree.ir.opdef import TERMINATOR, lookup
from flagtree.ir.types import Type, types_compatible

_STRUCTURAL = {"builtin.module", "func.func"}


def verify(module: Module) -> None:
    """Raise VerificationError for the first broken invariant in `module`."""
    if module.op.name != "builtin.module":
        raise VerificationError(f"top-level op must be builtin.module, not '{module.op.name}'")
    names: set[str] = set()
    for op in module.body.ops:
        if op.name != "func.func":
            _fail(op, "only func.func may appear at module level")
        _verify_function(op)
        if op.attributes["sym_name"] in names:
            _fail(op, f"redefines function @{op.attributes['sym_name']} (function names must be unique)")
        names.add(op.attributes["sym_name"])


def _fail(op: Operation, message: str) -> None:
    raise VerificationError(f"{op.location}: '{op.name}' op: {message}")


def _verify_function(func: Operation) -> None:
    if not isinstance(func.attributes.get("sym_name"), str):
        _fail(func, "needs a string 'sym_name'")
    if len(func.regions) != 1 or len(func.regions[0].blocks) != 1:
        _fail(func, "needs one region with one block")
    block = func.regions[0].block
    if block.terminator is None or block.terminator.name != "func.return":
        _fail(func, "body must end with func.return")
    _verify_block(block)


def _verify_block(block: Block) -> None:
    defined = {id(a) for a in block.args}
    for index, op in enumerate(block.ops):
        for i, operand in enumerate(op.operands):
            if id(operand) not in defined:
                _fail(op, _undefined_operand_message(block, i, operand))
        verify_op(op)
        if lookup(op.name) is not None and TERMINATOR in lookup(op.name).traits and index != len(block.ops) - 1:
            _fail(op, "is a terminator but is not last in its block")
        for region in op.regions:
            for inner in region.blocks:
                _verify_block(inner)
        defined.update(id(r) for r in op.results)


def _undefined_operand_message(block: Block, index: int, operand: Value) -> str:
    region_op = _owner(block)
    if region_op is None or not _defined_around(region_op, operand):
        return f"operand #{index} is used before it is defined (or defined in another scope)"
    return (f"operand #{index} is {_describe(operand)}, defined outside the region of '{region_op.name}' at "
            f"{region_op.location}; regions are isolated from above: pass it as an operand of the "
            f"{region_op.name} and read the matching region argument instead")


def _owner(block: Block) -> Operation | None:
    """The op whose region holds `block`."""
    return block.parent.parent if block.parent is not None else None


def _defined_around(op: Operation, value: Value) -> bool:
    """Whether `value` is defined in a block that encloses `op`."""
    home = value.block if isinstance(value, BlockArgument) else value.op.parent
    block = op.parent
    while block is not None and block is not home:
        owner = _owner(block)
        block = owner.parent if owner is not None else None
    return block is not None


def _describe(value: Value) -> str:
    if isinstance(value, BlockArgument):
        owner = _owner(value.block)
        where = f" of '{owner.name}' at {owner.location}" if owner is not None else ""
        return f"block argument #{value.index}{where}"
    return f"result #{value.index} of '{value.op.name}' at {value.op.location}"


def verify_op(op: Operation) -> None:
    """Check one op against its definition (counts, attributes, inferred types)."""
    if op.name in _STRUCTURAL:
        return
    opdef = lookup(op.name)
    if opdef is None:
        _fail(op, "unknown op; see docs/ops.md for the FTIR op set")
    lo, hi = opdef.operands
    if len(op.operands) < lo or (hi is not None and len(op.operands) > hi):
        want = str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}"
        _fail(op, f"expects {want} operands, has {len(op.operands)}")
    lo, hi = opdef.results
    if len(op.results) < lo or (hi is not None and len(op.results) > hi):
        want = str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}"
        _fail(op, f"expects {want} results, has {len(op.results)}")
    for key, value in op.attributes.items():
        spec = opdef.attrs.get(key)
        if spec is None:
            valid = ", ".join(sorted(opdef.attrs)) or "none"
            _fail(op, f"unknown attribute '{key}' (valid: {valid})")
        if not _attr_matches(value, spec.kinds):
            kinds = " or ".join(k.__name__ for k in spec.kinds)
            _fail(op, f"attribute '{key}' must be {kinds}, got {value!r}")
    for key, spec in opdef.attrs.items():
        if spec.required and key not in op.attributes:
            _fail(op, f"requires attribute '{key}' ({spec.doc})")
    if opdef.infer is not None:
        inferred = opdef.infer(op)
        if isinstance(inferred, str):
            _fail(op, inferred)
        _check_results(op, inferred)


def _attr_matches(value: object, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False
    if isinstance(value, tuple) and tuple in kinds:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, kinds)


def _check_results(op: Operation, inferred: list[Type]) -> None:
    if len(inferred) != len(op.results):
        _fail(op, f"has {len(op.results)} results but its operands imply {len(inferred)}")
    for result, expected in zip(op.results, inferred):
        if not types_compatible(result.type, expected):
            _fail(op, f"result #{result.index} has type {result.type}, but the operands imply {expected}")
