"""Vectorisable f32 approximations of exp, log, tanh and erf, as MLIR functions.

LLVM lowers `math.exp` and friends to scalar libm calls, which stop the loop vectoriser
and cost ~2 ns an element.  These branch-free polynomial forms (Cephes for exp and log,
Eigen's rational approximations for tanh and erf; all within a few ulp on the whole f32
range) are plain arith, so LLVM inlines them into the kernel loops and vectorises them.
The upstream `math-polynomial-approximation` pass does the same but is not in the
torch-mlir wheel's pass registry.
"""

from __future__ import annotations

from flagtree.ir.attributes import format_float


def _poly(x: str, coefficients: tuple[float, ...], name: str) -> list[str]:
    """Lines computing the polynomial c0*x^n + ... + cn (Horner's rule) into %{name}."""
    lines = [f"    %{name}_0 = arith.constant {format_float(coefficients[0])} : f32"]
    last = len(coefficients) - 1
    for i, c in enumerate(coefficients[1:], start=1):
        result = name if i == last else f"{name}_{i}"
        lines += [
            f"    %{name}_m{i} = arith.mulf %{name}_{i - 1}, {x} : f32",
            f"    %{name}_c{i} = arith.constant {format_float(c)} : f32",
            f"    %{result} = arith.addf %{name}_m{i}, %{name}_c{i} : f32",
        ]
    return lines


_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)

_EXP = """\
  func.func private @__ft_exp_f32(%x: f32) -> f32 {
    %hi = arith.constant 88.72283935546875 : f32
    %lo = arith.constant -104.0 : f32
    %inf = arith.constant 0x7F800000 : f32
    %log2e = arith.constant 1.44269502 : f32
    %ln2_hi = arith.constant 0.693359375 : f32
    %ln2_lo = arith.constant -2.12194440e-4 : f32
    %half = arith.constant 0.5 : f32
    %one = arith.constant 1.0 : f32
    %bias = arith.constant 127 : i32
    %c1 = arith.constant 1 : i32
    %c23 = arith.constant 23 : i32
    %xl = arith.maxnumf %x, %lo : f32
    %xc = arith.minnumf %xl, %hi : f32
    %t = arith.mulf %xc, %log2e : f32
    %th = arith.addf %t, %half : f32
    %n = math.floor %th : f32
    %a = arith.mulf %n, %ln2_hi : f32
    %b = arith.mulf %n, %ln2_lo : f32
    %r0 = arith.subf %xc, %a : f32
    %r = arith.subf %r0, %b : f32
    %z = arith.mulf %r, %r : f32
{poly}
    %pz = arith.mulf %p, %z : f32
    %pr = arith.addf %pz, %r : f32
    %y = arith.addf %pr, %one : f32
    %ni = arith.fptosi %n : f32 to i32
    %n1 = arith.shrsi %ni, %c1 : i32
    %n2 = arith.subi %ni, %n1 : i32
    %e1 = arith.addi %n1, %bias : i32
    %e2 = arith.addi %n2, %bias : i32
    %b1 = arith.shli %e1, %c23 : i32
    %b2 = arith.shli %e2, %c23 : i32
    %s1 = arith.bitcast %b1 : i32 to f32
    %s2 = arith.bitcast %b2 : i32 to f32
    %y1 = arith.mulf %y, %s1 : f32
    %y2 = arith.mulf %y1, %s2 : f32
    %over = arith.cmpf ogt, %x, %hi : f32
    %capped = arith.select %over, %inf, %y2 : f32
    %nan = arith.cmpf uno, %x, %x : f32
    %res = arith.select %nan, %x, %capped : f32
    return %res : f32
  }
"""

_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)

_LOG = """\
  func.func private @__ft_log_f32(%x: f32) -> f32 {
    %zero = arith.constant 0.0 : f32
    %one = arith.constant 1.0 : f32
    %half = arith.constant 0.5 : f32
    %inf = arith.constant 0x7F800000 : f32
    %ninf = arith.constant 0xFF800000 : f32
    %qnan = arith.constant 0x7FC00000 : f32
    %min_normal = arith.constant 1.17549435e-38 : f32
    %two23 = arith.constant 8388608.0 : f32
    %sqrthf = arith.constant 0.707106781186547524 : f32
    %ln2_hi = arith.constant 0.693359375 : f32
    %ln2_lo = arith.constant -2.12194440e-4 : f32
    %c0i = arith.constant 0 : i32
    %c23 = arith.constant 23 : i32
    %c126 = arith.constant 126 : i32
    %c149 = arith.constant 149 : i32
    %c255 = arith.constant 255 : i32
    %mant_mask = arith.constant -2139095041 : i32
    %half_bits = arith.constant 1056964608 : i32
    %denormal = arith.cmpf olt, %x, %min_normal : f32
    %xs = arith.mulf %x, %two23 : f32
    %xn = arith.select %denormal, %xs, %x : f32
    %bias = arith.select %denormal, %c149, %c126 : i32
    %bits = arith.bitcast %xn : f32 to i32
    %eb = arith.shrui %bits, %c23 : i32
    %ef = arith.andi %eb, %c255 : i32
    %ei = arith.subi %ef, %bias : i32
    %mb = arith.andi %bits, %mant_mask : i32
    %mh = arith.ori %mb, %half_bits : i32
    %m = arith.bitcast %mh : i32 to f32
    %small = arith.cmpf olt, %m, %sqrthf : f32
    %e0 = arith.sitofp %ei : i32 to f32
    %e1 = arith.subf %e0, %one : f32
    %e = arith.select %small, %e1, %e0 : f32
    %m2 = arith.addf %m, %m : f32
    %mm = arith.select %small, %m2, %m : f32
    %u = arith.subf %mm, %one : f32
    %z = arith.mulf %u, %u : f32
{poly}
    %pu = arith.mulf %p, %u : f32
    %y0 = arith.mulf %pu, %z : f32
    %lo_e = arith.mulf %e, %ln2_lo : f32
    %y1 = arith.addf %y0, %lo_e : f32
    %hz = arith.mulf %z, %half : f32
    %y2 = arith.subf %y1, %hz : f32
    %w = arith.addf %u, %y2 : f32
    %hi_e = arith.mulf %e, %ln2_hi : f32
    %r = arith.addf %w, %hi_e : f32
    %is_zero = arith.cmpf oeq, %x, %zero : f32
    %is_neg = arith.cmpf olt, %x, %zero : f32
    %is_inf = arith.cmpf oeq, %x, %inf : f32
    %is_nan = arith.cmpf uno, %x, %x : f32
    %r1 = arith.select %is_inf, %inf, %r : f32
    %r2 = arith.select %is_zero, %ninf, %r1 : f32
    %r3 = arith.select %is_neg, %qnan, %r2 : f32
    %res = arith.select %is_nan, %x, %r3 : f32
    return %res : f32
  }
"""

# Eigen's rational approximation: odd numerator over even denominator in x, on a clamped x.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)

_RATIONAL = """\
  func.func private @__ft_{name}_f32(%x: f32) -> f32 {{
    %bound = arith.constant {bound} : f32
    %nbound = arith.constant -{bound} : f32
    %tiny = arith.constant {tiny} : f32
    %slope = arith.constant {slope} : f32
    %xl = arith.maxnumf %x, %nbound : f32
    %xc = arith.minnumf %xl, %bound : f32
    %x2 = arith.mulf %xc, %xc : f32
{numerator}
{denominator}
    %px = arith.mulf %p, %xc : f32
    %ratio = arith.divf %px, %q : f32
    %ax = math.absf %x : f32
    %is_tiny = arith.cmpf olt, %ax, %tiny : f32
    %near = arith.mulf %x, %slope : f32
    %r = arith.select %is_tiny, %near, %ratio : f32
    %is_nan = arith.cmpf uno, %x, %x : f32
    %res = arith.select %is_nan, %x, %r : f32
    return %res : f32
  }}
"""


def _rational(name: str, bound: str, tiny: str, slope: float, p: tuple, q: tuple) -> str:
    numerator = "\n".join(_poly("%x2", p, "p"))
    denominator = "\n".join(_poly("%x2", q, "q"))
    return _RATIONAL.format(name=name, bound=bound, tiny=tiny, slope=format_float(slope), numerator=numerator,
                            denominator=denominator)


FUNCTIONS: dict[str, str] = {
    "exp": _EXP.replace("{poly}", "\n".join(_poly("%r", _EXP_POLY, "p"))),
    "log": _LOG.replace("{poly}", "\n".join(_poly("%u", _LOG_POLY, "p"))),
    # Below |x| = 4e-4 tanh(x) == x and erf(x) == 2x/sqrt(pi) to f32 precision.
    "tanh": _rational("tanh", "7.90531110763549805", "4.0e-4", 1.0, _TANH_P, _TANH_Q),
    "erf": _rational("erf", "4.0", "4.0e-4", 1.1283791670955126, _ERF_P, _ERF_Q),
}


def function_name(name: str) -> str:
    """The MLIR symbol of the f32 approximation of `name` (one of FUNCTIONS)."""
    return f"@__ft_{name}_f32"
