"""Check and time the `cuda` backend's generated Triton kernels on one NVIDIA GPU.

    python benchmarks/cuda_check.py            # after `pip install --no-deps --no-build-isolation -e .`

1. Correctness: fusion groups (elementwise chains, RMSNorm, softmax, SwiGLU, a reduction
   over a middle dim, a row too long to keep in registers, NaN/inf rows, 64-bit indexing,
   a dynamic size reused without recompiling) against an fp64 eager reference on fresh
   random inputs; the relative L2 error must be within the output dtype's tolerance
   (f32 1e-5, bf16 1.6e-2) and NaN/inf must appear exactly where the reference has them.
2. Timing of memory-bound groups: flagtree's kernel vs eager vs torch.compile's default
   backend, and a device-to-device copy of the same number of bytes (the bandwidth floor),
   all measured in this run with CUDA graphs (device time) and with triton.testing.do_bench
   (wall time per call, host overhead included, L2 flushed).

Prints a table and writes JSON to $OUT/cuda_check.json (or ./cuda_check.json).
Imports torch, triton and flagtree only.  Each group is built as plain FTIR and grouped
by the fuse-elementwise pass, so the kernels timed are the ones a compiled model runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.testing

import flagtree
import flagtree.passes.fuse_elementwise  # registers the pass
from flagtree.backends.cuda import CudaBackend
from flagtree.ir import Builder, DenseAttr, Module, Value, new_function, parse_type, verify
from flagtree.passes import PassManager

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
F64 = torch.float64


# --- building the groups ---------------------------------------------------------------------

def build(arg_types: list[str], body: Callable[[Builder, list[Value]], list[Value]]) -> Module:
    """`@main(args)` computing `body` with plain FTIR ops, then grouped by fuse-elementwise."""
    module = Module.empty()
    _, block = new_function(module, "main", [parse_type(t) for t in arg_types])
    builder = Builder(block)
    builder.create("func.return", body(builder, list(block.args)), result_types=[])
    verify(module)
    PassManager("fuse-elementwise").run(module)
    return module


def cast(b: Builder, x: Value, dtype: str) -> Value:
    return b.value("ft.cast", x, result_type=x.type.with_dtype(parse_type(dtype)))


def constant(b: Builder, value: float) -> Value:
    return b.value("ft.constant", value=DenseAttr(torch.tensor(value, dtype=torch.float32)),
                   result_type=parse_type("tensor<f32>"))


def narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to `dtype`, except in the fp64 reference (which keeps full precision)."""
    return t if t.dtype == F64 else t.to(dtype)


def wide(t: torch.Tensor) -> torch.Tensor:
    """Upcast to f32 (eager) or keep f64 (the reference)."""
    return t if t.dtype == F64 else t.float()


@dataclass
class Group:
    name: str
    arg_types: list[str]
    ftir: Callable[[Builder, list[Value]], list[Value]]
    torch_fn: Callable[..., torch.Tensor]  # the same math in torch; on f64 inputs it is the reference
    make_inputs: Callable[[], list[torch.Tensor]]
    timed: bool = True
    notes: list[str] = field(default_factory=list)


def _bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def add_mul(b: Builder, a: list[Value], out: str) -> list[Value]:
    x, y = (cast(b, v, "f32") for v in a)
    return [cast(b, b.value("ft.mul", b.value("ft.mul", b.value("ft.add", x, y), y), constant(b, 0.5)), out)]


def rms_norm_ftir(b: Builder, a: list[Value]) -> list[Value]:
    x, w = cast(b, a[0], "f32"), cast(b, a[1], "f32")
    mean_square = b.value("ft.mean", b.value("ft.mul", x, x), dims=(1,), keepdim=True)
    rstd = b.value("ft.rsqrt", b.value("ft.add", mean_square, constant(b, 1e-6)))
    return [cast(b, b.value("ft.mul", b.value("ft.mul", x, rstd), w), "bf16")]


def rms_norm_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = wide(x)
    return narrow(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * wide(w), torch.bfloat16)


def swiglu_ftir(b: Builder, a: list[Value]) -> list[Value]:
    gate, up = (cast(b, v, "f32") for v in a)
    return [cast(b, b.value("ft.mul", b.value("ft.silu", gate), up), "bf16")]


def softmax_ftir(out: str) -> Callable[[Builder, list[Value]], list[Value]]:
    def body(b: Builder, a: list[Value]) -> list[Value]:
        return [b.value("ft.softmax", a[0], dim=1, result_type=a[0].type.with_dtype(parse_type(out)))]

    return body


def _special_rows() -> torch.Tensor:
    """16x100 normal values with NaN in row 0, +inf in row 1, -inf in row 2, a row of -inf (row 3)."""
    x = torch.randn(16, 100, device="cuda")
    x[0, 5] = math.nan
    x[1, 7] = math.inf
    x[2, 3] = -math.inf
    x[3, :] = -math.inf
    return x


def nan_extrema_ftir(b: Builder, a: list[Value]) -> list[Value]:
    x = a[0]
    return [b.value("ft.amax", x, dims=(1,), keepdim=False), b.value("ft.amin", x, dims=(1,), keepdim=True),
            b.value("ft.softmax", x, dim=1, result_type=x.type)]


def nan_extrema_torch(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.amax(1), x.amin(1, keepdim=True), torch.softmax(x, 1)


def elementwise_nan_ftir(b: Builder, a: list[Value]) -> list[Value]:
    x, y = a
    return [b.value("ft.maximum", x, y), b.value("ft.minimum", x, y), b.value("ft.clamp", x, min=-1.0, max=1.0),
            b.value("ft.relu", x)]


def elementwise_nan_torch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.maximum(x, y), torch.minimum(x, y), x.clamp(-1.0, 1.0), torch.relu(x)


GROUPS = [
    Group("add_mul bf16->bf16 (16M)", ["tensor<4096x4096xbf16>"] * 2, lambda b, a: add_mul(b, a, "bf16"),
          lambda x, y: narrow((wide(x) + wide(y)) * wide(y) * 0.5, torch.bfloat16),
          lambda: [_bf16(4096, 4096), _bf16(4096, 4096)]),
    Group("add_mul bf16->f32 (16M)", ["tensor<4096x4096xbf16>"] * 2, lambda b, a: add_mul(b, a, "f32"),
          lambda x, y: narrow((wide(x) + wide(y)) * wide(y) * 0.5, torch.float32),
          lambda: [_bf16(4096, 4096), _bf16(4096, 4096)]),
    Group("rms_norm bf16 4096x7168", ["tensor<4096x7168xbf16>", "tensor<7168xbf16>"], rms_norm_ftir,
          rms_norm_torch, lambda: [_bf16(4096, 7168), _bf16(7168)]),
    Group("swiglu bf16 8192x4096", ["tensor<8192x4096xbf16>"] * 2, swiglu_ftir,
          lambda g, u: narrow(torch.nn.functional.silu(wide(g)) * wide(u), torch.bfloat16),
          lambda: [_bf16(8192, 4096), _bf16(8192, 4096)]),
    Group("softmax bf16->bf16 16384x1024", ["tensor<16384x1024xbf16>"], softmax_ftir("bf16"),
          lambda x: narrow(torch.softmax(wide(x), 1), torch.bfloat16), lambda: [_bf16(16384, 1024, scale=3.0)]),
    Group("sum over a middle dim f32 64x1000x130", ["tensor<64x1000x130xf32>"],
          lambda b, a: [b.value("ft.sum", a[0], dims=(1,), keepdim=False)], lambda x: x.sum(1),
          lambda: [torch.randn(64, 1000, 130, device="cuda")], timed=False),
    Group("softmax f32 with a looped 40000-long row", ["tensor<64x40000xf32>"], softmax_ftir("f32"),
          lambda x: torch.softmax(x, 1), lambda: [torch.randn(64, 40000, device="cuda") * 4], timed=False),
    Group("amax/amin/softmax rows with NaN and inf", ["tensor<16x100xf32>"], nan_extrema_ftir, nan_extrema_torch,
          lambda: [_special_rows()], timed=False),
    Group("maximum/minimum/clamp/relu with NaN and inf", ["tensor<16x100xf32>"] * 2, elementwise_nan_ftir,
          elementwise_nan_torch, lambda: [_special_rows(), _special_rows().flip(0)], timed=False),
]


# --- checking ---------------------------------------------------------------------------------

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, str]:
    """Relative L2 error over the finite reference values, and a description of any NaN/inf mismatch."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return math.inf, f"shape {list(a.shape)} != {list(e.shape)}"
    if not torch.equal(a.isnan(), e.isnan()):
        return math.inf, f"NaN at {int((a.isnan() != e.isnan()).sum())} wrong places"
    infinite = e.isinf()
    if not torch.equal(a[infinite], e[infinite]) or not torch.equal(a.isinf(), infinite):
        return math.inf, "inf mismatch"
    finite = ~(e.isnan() | infinite)
    error = torch.linalg.vector_norm(a[finite] - e[finite]) / torch.linalg.vector_norm(e[finite]).clamp_min(1e-30)
    return float(error), ""


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check(group: Group, backend: CudaBackend, caps) -> tuple[dict, Callable, list[torch.Tensor]]:
    module = build(group.arg_types, group.ftir)
    regions = sum(op.name == "ft.fusion" for op in module.walk())
    start = time.perf_counter()
    plan = backend.compile(module, caps)
    inputs = group.make_inputs()
    actual = plan(*inputs)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    reference = _as_list(group.torch_fn(*(t.double() if t.is_floating_point() else t for t in inputs)))
    eager = _as_list(group.torch_fn(*inputs))
    rows = []
    ok = regions >= 1 and not plan.fallback_ops
    for a, r, e in zip(actual, reference, eager, strict=True):
        error, problem = relative_error(a, r)
        eager_error, _ = relative_error(e, r)
        passed = not problem and error <= TOLERANCE[a.dtype]
        ok &= passed
        rows.append({"dtype": str(a.dtype), "rel_l2_error": error, "eager_rel_l2_error": eager_error,
                     "problem": problem, "passed": passed})
    result = {"group": group.name, "passed": ok, "fusion_regions": regions, "fallbacks": dict(plan.fallback_ops),
              "outputs": rows, "first_call_s": first_call}
    return result, plan, inputs


def check_dynamic_sizes(backend: CudaBackend, caps) -> dict:
    """One compiled kernel serves every sequence length: no recompile for a new size."""
    module = build(["tensor<?x4096xbf16>", "tensor<4096xbf16>"], rms_norm_ftir)
    plan, kernels = backend.compile_with_kernels(module, caps)
    jit = kernels[0].kernel
    compiled = []
    errors = []
    for rows in (1000, 3001, 4095, 17):
        x, w = _bf16(rows, 4096), _bf16(4096)
        errors.append(relative_error(plan(x, w)[0], rms_norm_torch(x.double(), w.double()))[0])
        compiled.append(sum(len(cache[0]) for cache in jit.device_caches.values()))
    passed = compiled == [1] * len(compiled) and max(errors) <= TOLERANCE[torch.bfloat16]
    return {"group": "dynamic rows: 1000, 3001, 4095, 17 rows, one compiled kernel", "passed": passed,
            "compiled_variants_after_each_size": compiled, "rel_l2_errors": errors}


def check_int64_indexing(backend: CudaBackend, caps) -> dict:
    """A launch over more than 2**31 elements switches to 64-bit offsets (INDEX_64)."""
    n = 2**31 + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n * 2 + (1 << 30):
        return {"group": "64-bit indexing", "passed": None, "skipped": f"needs {4 * n * 2 >> 30} GiB free"}
    module = build([f"tensor<{n}xbf16>"] * 2, lambda b, a: [b.value("ft.add", a[0], a[1])])
    x, y = _bf16(n), _bf16(n)
    out = backend.compile(module, caps)(x, y)[0]
    passed = torch.equal(out, x + y)  # one rounding of an f32 sum: bit-exact with eager
    del x, y, out
    torch.cuda.empty_cache()
    return {"group": f"64-bit indexing ({n} elements)", "passed": passed}


# --- timing -----------------------------------------------------------------------------------

def _time(fn: Callable[[], object]) -> dict:
    graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    call_ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return {"graph_us": graph_ms * 1e3, "call_us": call_ms * 1e3}


def time_group(group: Group, plan: Callable, inputs: list[torch.Tensor]) -> dict:
    outputs = _as_list(plan(*inputs))
    moved = sum(t.numel() * t.element_size() for t in [*inputs, *outputs])
    source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    compiled = torch.compile(group.torch_fn)
    start = time.perf_counter()
    compiled(*inputs)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    timings = {
        "flagtree": _time(lambda: plan(*inputs)),
        "eager": _time(lambda: group.torch_fn(*inputs)),
        "torch.compile": _time(lambda: compiled(*inputs)),
        "copy": _time(lambda: target.copy_(source)),
    }
    copy_us = timings["copy"]["graph_us"]
    return {"group": group.name, "bytes": moved, "torch_compile_first_call_s": compile_s, "timings": timings,
            "flagtree_GBps": moved / timings["flagtree"]["graph_us"] / 1e3,
            "copy_GBps": moved / copy_us / 1e3,
            "fraction_of_copy_bandwidth": copy_us / timings["flagtree"]["graph_us"],
            "speedup_vs_eager": timings["eager"]["graph_us"] / timings["flagtree"]["graph_us"],
            "speedup_vs_torch_compile": timings["torch.compile"]["graph_us"] / timings["flagtree"]["graph_us"]}


# --- report -----------------------------------------------------------------------------------

def print_tables(report: dict) -> None:
    print(f"\n{report['machine']['device']}  torch {report['machine']['torch']}  triton "
          f"{report['machine']['triton']}  {report['date']}  seed {report['seed']}")
    print(f"capabilities: {report['machine']['capabilities']}\n")
    print(f"{'correctness':<58} {'result':<6} {'rel L2 error (eager)'}")
    for c in report["correctness"]:
        verdict = "skip" if c["passed"] is None else "ok" if c["passed"] else "FAIL"
        errors = ", ".join(f"{o['rel_l2_error']:.2e} ({o['eager_rel_l2_error']:.2e}) {o['problem']}".rstrip()
                           for o in c.get("outputs", []))
        print(f"{c['group']:<58} {verdict:<6} {errors or c.get('skipped', '')}")
    print(f"\n{'memory-bound group':<32} {'MB':>6} {'flagtree':>9} {'eager':>9} {'compile':>9} {'copy':>9} "
          f"{'GB/s':>7} {'of copy':>8} {'call us: flagtree/eager/compile'}")
    for t in report["timings"]:
        g = {k: v["graph_us"] for k, v in t["timings"].items()}
        c = {k: v["call_us"] for k, v in t["timings"].items()}
        print(f"{t['group']:<32} {t['bytes'] / 1e6:>6.0f} {g['flagtree']:>8.1f}u {g['eager']:>8.1f}u "
              f"{g['torch.compile']:>8.1f}u {g['copy']:>8.1f}u {t['flagtree_GBps']:>7.0f} "
              f"{t['fraction_of_copy_bandwidth']:>7.0%} {c['flagtree']:.1f} / {c['eager']:.1f} / "
              f"{c['torch.compile']:.1f}")
    print("\n(device times from CUDA-graph replays; 'call us' is do_bench wall time per call, L2 flushed)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-timing", action="store_true", help="only check correctness")
    options = parser.parse_args()
    backend = CudaBackend()
    availability = backend.availability()
    if not availability.ok:
        print(f"the cuda backend is not available here: {availability.reason}", file=sys.stderr)
        return 2
    caps = backend.capabilities()
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "machine": {"device": torch.cuda.get_device_name(), "capabilities": caps.describe(),
                    "torch": torch.__version__, "triton": triton.__version__, "flagtree": flagtree.__version__,
                    "python": platform.python_version()},
        "correctness": [], "timings": [],
    }
    for group in GROUPS:
        result, plan, inputs = check(group, backend, caps)
        report["correctness"].append(result)
        if group.timed and not options.no_timing:
            report["timings"].append(time_group(group, plan, inputs))
        del plan, inputs
        torch.cuda.empty_cache()
    report["correctness"].append(check_dynamic_sizes(backend, caps))
    report["correctness"].append(check_int64_indexing(backend, caps))
    print_tables(report)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cuda_check.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir / 'cuda_check.json'}")
    return 0 if all(c["passed"] is not False for c in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
