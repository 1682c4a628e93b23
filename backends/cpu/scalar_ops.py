"""FTIR elementwise ops on scalars → arith / math ops (the bodies of linalg.generic ops).

Every value is in its compute type (see mlir_text.compute_type): f16/bf16 arrive as f32,
and `lower` returns the op's f32 result unrounded (the emitter rounds it to the op's type,
see `round_to`, where eager torch would).
Semantics follow each op's eager-torch reference (flagtree/ir/ops/elementwise.py):
NaN-propagating max/min, truncating integer division, Python-style remainder.
"""

from __future__ import annotations

import math
from typing import Any

from flagtree.backends.cpu import approx
from flagtree.backends.cpu.mlir_text import FunctionWriter, UnsupportedError, compute_type, is_narrow_float
from flagtree.ir.types import ScalarType

Operand = tuple[str, ScalarType]  # (SSA name in compute type, FTIR element type)


def _is_float(dtype: ScalarType) -> bool:
    return dtype.is_float


def _float_call(w: FunctionWriter, name: str, x: str, mlir_type: str) -> str:
    """math.NAME, or on f32 the vectorisable approximation when approx has one."""
    if mlir_type == "f32" and name in approx.FUNCTIONS:
        w.helpers.add(name)
        return w.emit(f"func.call {approx.function_name(name)}({x}) : (f32) -> f32")
    return w.emit(f"math.{name} {x} : {mlir_type}")


def _libm_call(w: FunctionWriter, name: str, x: str, mlir_type: str) -> str:
    """A libm function called directly: MLIR's math-to-llvm expands log1p/expm1 naively
    (log(1 + x)), losing all precision for small x."""
    symbol = name + ("f" if mlir_type == "f32" else "")
    w.helpers.add(f"libm:{symbol}:{mlir_type}")
    return w.emit(f"func.call @{symbol}({x}) : ({mlir_type}) -> {mlir_type}")


def _exp(w: FunctionWriter, x: str, t: str) -> str:
    return _float_call(w, "exp", x, t)


def _sigmoid(w: FunctionWriter, x: str, t: str) -> str:
    negated = w.emit(f"arith.negf {x} : {t}")
    e = _exp(w, negated, t)
    denominator = w.emit(f"arith.addf {w.constant(1.0, t)}, {e} : {t}")
    return w.emit(f"arith.divf {w.constant(1.0, t)}, {denominator} : {t}")


def _unary_float(w: FunctionWriter, name: str, x: str, t: str, attrs: dict[str, Any]) -> str:
    direct = {"exp2": "exp2", "log2": "log2", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin", "cos": "cos",
              "tan": "tan", "atan": "atan", "floor": "floor", "ceil": "ceil", "round": "roundeven", "trunc": "trunc",
              "exp": "exp", "log": "log", "tanh": "tanh", "erf": "erf"}
    if name in direct:
        return _float_call(w, direct[name], x, t)
    if name in ("log1p", "expm1"):
        return _libm_call(w, name, x, t)
    if name == "reciprocal":
        return w.emit(f"arith.divf {w.constant(1.0, t)}, {x} : {t}")
    if name == "sigmoid":
        return _sigmoid(w, x, t)
    if name == "silu":
        return w.emit(f"arith.mulf {x}, {_sigmoid(w, x, t)} : {t}")
    if name == "gelu":
        return _gelu(w, x, t, attrs.get("approximate", "none"))
    raise UnsupportedError(f"'ft.{name}' has no cpu lowering")


def _gelu(w: FunctionWriter, x: str, t: str, approximate: str) -> str:
    half_x = w.emit(f"arith.mulf {x}, {w.constant(0.5, t)} : {t}")
    if approximate == "tanh":
        x3 = w.emit(f"arith.mulf {x}, {w.emit(f'arith.mulf {x}, {x} : {t}')} : {t}")
        inner = w.emit(f"arith.addf {x}, {w.emit(f'arith.mulf {x3}, {w.constant(0.044715, t)} : {t}')} : {t}")
        scaled = w.emit(f"arith.mulf {inner}, {w.constant(math.sqrt(2 / math.pi), t)} : {t}")
        s = _float_call(w, "tanh", scaled, t)
    else:
        scaled = w.emit(f"arith.mulf {x}, {w.constant(1 / math.sqrt(2), t)} : {t}")
        s = _float_call(w, "erf", scaled, t)
    return w.emit(f"arith.mulf {half_x}, {w.emit(f'arith.addf {s}, {w.constant(1.0, t)} : {t}')} : {t}")


def _sign(w: FunctionWriter, x: str, t: str, is_float: bool) -> str:
    zero, one, minus_one = (w.constant(v, t) for v in (0, 1, -1))
    # torch.sign(NaN) and torch.sign(-0.0) are 0.0: every non-ordered case falls to zero.
    compare = "arith.cmpf o" if is_float else "arith.cmpi s"
    positive = w.emit(f"{compare}gt, {x}, {zero} : {t}")
    negative = w.emit(f"{compare}lt, {x}, {zero} : {t}")
    low = w.emit(f"arith.select {negative}, {minus_one}, {zero} : {t}")
    return w.emit(f"arith.select {positive}, {one}, {low} : {t}")


def _unary_any(w: FunctionWriter, name: str, x: str, dtype: ScalarType, t: str) -> str:
    is_float = _is_float(dtype)
    if name == "neg":
        return w.emit(f"arith.negf {x} : {t}") if is_float else w.emit(f"arith.subi {w.constant(0, t)}, {x} : {t}")
    if name == "abs":
        return w.emit(f"math.absf {x} : {t}") if is_float else w.emit(f"math.absi {x} : {t}")
    if name == "sign":
        return x if t == "i1" else _sign(w, x, t, is_float)
    if name == "relu":
        op = "arith.maximumf" if is_float else "arith.maxsi"
        return w.emit(f"{op} {x}, {w.constant(0, t)} : {t}")
    if name == "bitwise_not":
        return w.emit(f"arith.xori {x}, {w.constant(-1 if t != 'i1' else True, t)} : {t}")
    raise UnsupportedError(f"'ft.{name}' has no cpu lowering")


def to_bool(w: FunctionWriter, x: str, dtype: ScalarType) -> str:
    """x != 0 as i1 (NaN is true, as in torch)."""
    t = compute_type(dtype)
    if t == "i1":
        return x
    if _is_float(dtype):
        return w.emit(f"arith.cmpf une, {x}, {w.constant(0.0, t)} : {t}")
    return w.emit(f"arith.cmpi ne, {x}, {w.constant(0, t)} : {t}")


def _predicate(w: FunctionWriter, name: str, x: str, dtype: ScalarType) -> str:
    t = compute_type(dtype)
    if name == "logical_not":
        return w.emit(f"arith.xori {to_bool(w, x, dtype)}, {w.constant(True, 'i1')} : i1")
    if not _is_float(dtype):
        return w.constant(False, "i1")
    if name == "isnan":
        return w.emit(f"arith.cmpf uno, {x}, {x} : {t}")
    magnitude = w.emit(f"math.absf {x} : {t}")
    return w.emit(f"arith.cmpf oeq, {magnitude}, {w.constant(math.inf, t)} : {t}")


_FLOAT_BINARY = {"add": "arith.addf", "sub": "arith.subf", "mul": "arith.mulf", "div": "arith.divf",
                 "maximum": "arith.maximumf", "minimum": "arith.minimumf", "fmod": "arith.remf",
                 "pow": "math.powf", "atan2": "math.atan2"}
_INT_BINARY = {"add": "arith.addi", "sub": "arith.subi", "mul": "arith.muli", "maximum": "arith.maxsi",
               "minimum": "arith.minsi", "bitwise_and": "arith.andi", "bitwise_or": "arith.ori",
               "bitwise_xor": "arith.xori"}
# torch treats bool + bool as or, bool * bool as and.
_BOOL_BINARY = {"add": "arith.ori", "mul": "arith.andi", "maximum": "arith.ori", "minimum": "arith.andi",
                "bitwise_and": "arith.andi", "bitwise_or": "arith.ori", "bitwise_xor": "arith.xori"}
_INT_DIVISIONS = {"div": "arith.divsi", "floordiv": "arith.floordivsi", "fmod": "arith.remsi",
                  "remainder": "arith.remsi"}


def _safe_divisor(w: FunctionWriter, y: str, t: str) -> str:
    """y with 0 and -1 replaced by 1: x86 integer division traps on both (÷0, INT_MIN÷-1),
    which would kill the process; the -1 case is computed separately by negation."""
    zero_or_minus_one = w.emit(
        f"arith.ori {w.emit(f'arith.cmpi eq, {y}, {w.constant(0, t)} : {t}')}, "
        f"{w.emit(f'arith.cmpi eq, {y}, {w.constant(-1, t)} : {t}')} : i1")
    return w.emit(f"arith.select {zero_or_minus_one}, {w.constant(1, t)}, {y} : {t}")


def _int_division(w: FunctionWriter, name: str, x: str, y: str, t: str) -> str:
    quotient_or_rest = w.emit(f"{_INT_DIVISIONS[name]} {x}, {_safe_divisor(w, y, t)} : {t}")
    minus_one = w.emit(f"arith.cmpi eq, {y}, {w.constant(-1, t)} : {t}")
    by_minus_one = w.constant(0, t) if name in ("fmod", "remainder") else w.emit(
        f"arith.subi {w.constant(0, t)}, {x} : {t}")
    result = w.emit(f"arith.select {minus_one}, {by_minus_one}, {quotient_or_rest} : {t}")
    return _python_remainder(w, result, y, t, integer=True) if name == "remainder" else result


def _python_remainder(w: FunctionWriter, rest: str, y: str, t: str, integer: bool) -> str:
    """C remainder (sign of x) → Python remainder (sign of y), as torch.remainder."""
    zero = w.constant(0, t)
    if integer:
        nonzero = w.emit(f"arith.cmpi ne, {rest}, {zero} : {t}")
        signs_differ = w.emit(f"arith.xori {w.emit(f'arith.cmpi slt, {rest}, {zero} : {t}')}, "
                              f"{w.emit(f'arith.cmpi slt, {y}, {zero} : {t}')} : i1")
        adjusted = w.emit(f"arith.addi {rest}, {y} : {t}")
    else:
        nonzero = w.emit(f"arith.cmpf one, {rest}, {zero} : {t}")
        signs_differ = w.emit(f"arith.xori {w.emit(f'arith.cmpf olt, {rest}, {zero} : {t}')}, "
                              f"{w.emit(f'arith.cmpf olt, {y}, {zero} : {t}')} : i1")
        adjusted = w.emit(f"arith.addf {rest}, {y} : {t}")
    fix = w.emit(f"arith.andi {nonzero}, {signs_differ} : i1")
    return w.emit(f"arith.select {fix}, {adjusted}, {rest} : {t}")


def _float_floordiv(w: FunctionWriter, x: str, y: str, t: str) -> str:
    """torch's div_floor_floating: floor of the exact quotient via fmod (so huge quotients
    and inf/NaN operands give eager's results, not floor(x / y))."""
    zero, one, half = w.constant(0.0, t), w.constant(1.0, t), w.constant(0.5, t)
    quotient = w.emit(f"arith.divf {x}, {y} : {t}")
    rest = w.emit(f"arith.remf {x}, {y} : {t}")
    exact = w.emit(f"arith.divf {w.emit(f'arith.subf {x}, {rest} : {t}')}, {y} : {t}")
    rest_nonzero = w.emit(f"arith.cmpf une, {rest}, {zero} : {t}")
    signs_differ = w.emit(f"arith.xori {w.emit(f'arith.cmpf olt, {y}, {zero} : {t}')}, "
                          f"{w.emit(f'arith.cmpf olt, {rest}, {zero} : {t}')} : i1")
    step_down = w.emit(f"arith.andi {rest_nonzero}, {signs_differ} : i1")
    div = w.emit(f"arith.select {step_down}, {w.emit(f'arith.subf {exact}, {one} : {t}')}, {exact} : {t}")
    floor = w.emit(f"math.floor {div} : {t}")
    round_up = w.emit(f"arith.cmpf ogt, {w.emit(f'arith.subf {div}, {floor} : {t}')}, {half} : {t}")
    floored = w.emit(f"arith.select {round_up}, {w.emit(f'arith.addf {floor}, {one} : {t}')}, {floor} : {t}")
    signed_zero = w.emit(f"math.copysign {zero}, {quotient} : {t}")
    div_is_zero = w.emit(f"arith.cmpf oeq, {div}, {zero} : {t}")
    result = w.emit(f"arith.select {div_is_zero}, {signed_zero}, {floored} : {t}")
    by_zero = w.emit(f"arith.cmpf oeq, {y}, {zero} : {t}")
    return w.emit(f"arith.select {by_zero}, {quotient}, {result} : {t}")


def _binary(w: FunctionWriter, name: str, x: str, y: str, dtype: ScalarType) -> str:
    t = compute_type(dtype)
    if _is_float(dtype):
        if name == "floordiv":
            return _float_floordiv(w, x, y, t)
        if name == "remainder":
            return _python_remainder(w, w.emit(f"arith.remf {x}, {y} : {t}"), y, t, integer=False)
        if name in _FLOAT_BINARY:
            return w.emit(f"{_FLOAT_BINARY[name]} {x}, {y} : {t}")
    elif t == "i1":
        if name in _BOOL_BINARY:
            return w.emit(f"{_BOOL_BINARY[name]} {x}, {y} : i1")
    elif name in _INT_BINARY:
        return w.emit(f"{_INT_BINARY[name]} {x}, {y} : {t}")
    elif name in _INT_DIVISIONS:
        return _int_division(w, name, x, y, t)
    raise UnsupportedError(f"'ft.{name}' on {dtype} has no cpu lowering")


_FLOAT_PREDICATES = {"eq": "oeq", "ne": "une", "lt": "olt", "le": "ole", "gt": "ogt", "ge": "oge"}
_INT_PREDICATES = {"eq": "eq", "ne": "ne", "lt": "slt", "le": "sle", "gt": "sgt", "ge": "sge"}
_BOOL_PREDICATES = {"eq": "eq", "ne": "ne", "lt": "ult", "le": "ule", "gt": "ugt", "ge": "uge"}


def _compare(w: FunctionWriter, name: str, x: str, y: str, dtype: ScalarType) -> str:
    t = compute_type(dtype)
    if _is_float(dtype):
        return w.emit(f"arith.cmpf {_FLOAT_PREDICATES[name]}, {x}, {y} : {t}")
    predicates = _BOOL_PREDICATES if t == "i1" else _INT_PREDICATES
    return w.emit(f"arith.cmpi {predicates[name]}, {x}, {y} : {t}")


def _logical(w: FunctionWriter, name: str, a: Operand, b: Operand) -> str:
    op = {"logical_and": "arith.andi", "logical_or": "arith.ori", "logical_xor": "arith.xori"}[name]
    return w.emit(f"{op} {to_bool(w, *a)}, {to_bool(w, *b)} : i1")


def _clamp(w: FunctionWriter, x: str, dtype: ScalarType, attrs: dict[str, Any]) -> str:
    t = compute_type(dtype)
    if t == "i1":
        raise UnsupportedError("'ft.clamp' on i1 has no cpu lowering")
    low_op, high_op = ("arith.maximumf", "arith.minimumf") if _is_float(dtype) else ("arith.maxsi", "arith.minsi")
    if attrs.get("min") is not None:
        x = w.emit(f"{low_op} {x}, {w.constant(attrs['min'], t)} : {t}")
    if attrs.get("max") is not None:
        x = w.emit(f"{high_op} {x}, {w.constant(attrs['max'], t)} : {t}")
    return x


def widen(w: FunctionWriter, x: str, element: str) -> str:
    """A loaded f16/bf16 element as the f32 it is computed in.  bf16 widens by a shift:
    LLVM's own bf16 conversions stop the loop vectoriser in larger loop bodies."""
    if element != "bf16":
        return w.emit(f"arith.extf {x} : {element} to f32")
    sixteen = w.constant(16, "i32")
    bits = w.emit(f"arith.extui {w.emit(f'arith.bitcast {x} : bf16 to i16')} : i16 to i32")
    return w.emit(f"arith.bitcast {w.emit(f'arith.shli {bits}, {sixteen} : i32')} : i32 to f32")


def narrow(w: FunctionWriter, x: str, element: str) -> str:
    """An f32 rounded to nearest-even f16/bf16, as torch rounds (NaN becomes 0x7FC0)."""
    if element != "bf16":
        return w.emit(f"arith.truncf {x} : f32 to {element}")
    sixteen, nan = w.constant(16, "i32"), w.constant(0x7FC0, "i32")
    rounded = w.emit(f"arith.shrui {_bf16_rounding_sum(w, x)}, {sixteen} : i32")
    is_nan = w.emit(f"arith.cmpf uno, {x}, {x} : f32")
    result = w.emit(f"arith.select {is_nan}, {nan}, {rounded} : i32")
    return w.emit(f"arith.bitcast {w.emit(f'arith.trunci {result} : i32 to i16')} : i16 to bf16")


def round_to(w: FunctionWriter, x: str, element: str) -> str:
    """An f32 rounded to nearest-even f16/bf16 and held in f32 again: the value eager torch
    stores for an op whose result has that type.  bf16 clears the low half of the biased
    bits instead of a round trip through i16, which is shorter and keeps NaN as it is."""
    if element != "bf16":
        return widen(w, narrow(w, x, element), element)
    low_half_cleared = w.constant(-0x10000, "i32")
    high_half = w.emit(f"arith.andi {_bf16_rounding_sum(w, x)}, {low_half_cleared} : i32")
    rounded = w.emit(f"arith.bitcast {high_half} : i32 to f32")
    is_nan = w.emit(f"arith.cmpf uno, {x}, {x} : f32")
    return w.emit(f"arith.select {is_nan}, {x}, {rounded} : f32")


def _bf16_rounding_sum(w: FunctionWriter, x: str) -> str:
    """The bits of f32 `x` plus the bias that rounds them to nearest-even at bit 16: their
    high half is then x's bf16 (for every x but NaN, which the bias can carry into the sign)."""
    sixteen, one, half = (w.constant(v, "i32") for v in (16, 1, 0x7FFF))
    bits = w.emit(f"arith.bitcast {x} : f32 to i32")
    odd = w.emit(f"arith.andi {w.emit(f'arith.shrui {bits}, {sixteen} : i32')}, {one} : i32")
    bias = w.emit(f"arith.addi {odd}, {half} : i32")
    return w.emit(f"arith.addi {bits}, {bias} : i32")


def cast(w: FunctionWriter, x: str, source: ScalarType, target: ScalarType) -> str:
    """Convert between compute types; a cast to f16/bf16 rounds to that type (held in the
    f32 it is computed in), so explicit casts round exactly as eager torch."""
    s, t = compute_type(source), compute_type(target)
    if target.name == "i1":
        return to_bool(w, x, source)
    if _is_float(source) and _is_float(target):
        if is_narrow_float(target) and source != target:
            single = x if s == "f32" else w.emit(f"arith.truncf {x} : {s} to f32")
            return round_to(w, single, target.name)
        if s == t:
            return x
        wider = _bitwidth(t) > _bitwidth(s)
        return w.emit(f"arith.{'extf' if wider else 'truncf'} {x} : {s} to {t}")
    if _is_float(target):
        op = "arith.uitofp" if s == "i1" else "arith.sitofp"
        converted = w.emit(f"{op} {x} : {s} to {t}")
        return round_to(w, converted, target.name) if is_narrow_float(target) else converted  # 257 → 256 in bf16
    if _is_float(source):
        return w.emit(f"arith.fptosi {x} : {s} to {t}")
    if s == t:
        return x
    if _bitwidth(t) > _bitwidth(s):
        return w.emit(f"arith.{'extui' if s == 'i1' else 'extsi'} {x} : {s} to {t}")
    return w.emit(f"arith.trunci {x} : {s} to {t}")


def _bitwidth(mlir_type: str) -> int:
    return 1 if mlir_type == "i1" else int(mlir_type[1:])


_UNARY_FLOAT_NAMES = frozenset({
    "exp", "exp2", "log", "log2", "log1p", "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "atan",
    "sigmoid", "silu", "erf", "reciprocal", "floor", "ceil", "round", "trunc", "gelu"})
_UNARY_ANY_NAMES = frozenset({"neg", "abs", "sign", "relu", "bitwise_not"})
_PREDICATE_NAMES = frozenset({"isnan", "isinf", "logical_not"})
_BINARY_NAMES = frozenset({*_FLOAT_BINARY, *_INT_BINARY, *_INT_DIVISIONS, "floordiv", "remainder"})
_LOGICAL_NAMES = frozenset({"logical_and", "logical_or", "logical_xor"})

def lower(w: FunctionWriter, op_name: str, operands: list[Operand], result: ScalarType,
          attrs: dict[str, Any]) -> str:
    """Emit the scalar computation of elementwise op `op_name` (e.g. "ft.add"); returns its SSA name.

    Raises UnsupportedError for ops and types without a lowering (callers fall back)."""
    name = op_name.removeprefix("ft.")
    if name in _UNARY_FLOAT_NAMES:
        return _unary_float(w, name, operands[0][0], compute_type(result), attrs)
    if name in _UNARY_ANY_NAMES:
        return _unary_any(w, name, operands[0][0], result, compute_type(result))
    if name in _PREDICATE_NAMES:
        return _predicate(w, name, *operands[0])
    if name in _BINARY_NAMES:
        return _binary(w, name, operands[0][0], operands[1][0], result)
    if name in _FLOAT_PREDICATES:
        return _compare(w, name, operands[0][0], operands[1][0], operands[0][1])
    if name in _LOGICAL_NAMES:
        return _logical(w, name, operands[0], operands[1])
    if name == "where":
        return w.emit(f"arith.select {operands[0][0]}, {operands[1][0]}, {operands[2][0]} : {compute_type(result)}")
    if name == "clamp":
        return _clamp(w, operands[0][0], result, attrs)
    if name == "cast":
        return cast(w, operands[0][0], operands[0][1], result)
    raise UnsupportedError(f"'{op_name}' has no cpu lowering")
