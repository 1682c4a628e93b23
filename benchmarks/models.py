"""Time and check compiled zoo models: flagtree vs eager vs torch.compile's default backend (Inductor).

    python benchmarks/models.py                                  # CUDA when available
    python benchmarks/models.py --device cpu --iters 5 --dtypes float32

For each (model, dtype, backend) of `examples.zoo` models ("transformer_block", "moe"):
- time per call: median of --iters timed calls after warmup (CUDA events on CUDA,
  time.perf_counter on CPU), all backends measured in this run under torch.no_grad();
- correctness: relative L2 error against an fp64 eager run of the same weights and inputs,
  flagged above the dtype's tolerance (f32 1e-5, bf16 1.6e-2);
- cold compile time: the first call in a fresh subprocess with empty cache dirs
  (FLAGTREE_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), and warm compile time:
  the first call in a second fresh subprocess reusing them (skip with --no-compile-times).

Prints a table and writes JSON to $OUT/models.json (or ./models.json).  Exits 1 when an
output is outside its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import flagtree

# Running as `python benchmarks/models.py` puts benchmarks/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.zoo import ZOO

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("transformer_block", "moe")
BACKENDS = ("eager", "inductor", "flagtree")
COMPILED_BACKENDS = ("inductor", "flagtree")
MAX_SEQ = 64  # the zoo's rotary tables are 64 positions long
WARMUP_CALLS = 10
SEED = 0


# --- building and running ---------------------------------------------------------------------

def build(model_name: str, dtype: torch.dtype, args: argparse.Namespace) -> tuple[torch.nn.Module, tuple]:
    """The zoo model and its inputs, with fixed weights so every backend sees the same model."""
    return ZOO[model_name](dtype=dtype, seed=SEED, device=args.device, batch=args.batch, seq=args.seq)


def compiled(model: torch.nn.Module, backend: str, mode: str | None = None) -> Callable:
    """`model` as run by `backend` (one of BACKENDS), compiled with torch.compile's `mode`."""
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, mode=mode)
    return torch.compile(model, backend="flagtree", mode=mode)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flat_output(output: object) -> torch.Tensor:
    """All floating-point tensors of a model output, flattened and joined, in fp64."""
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return torch.cat([t.detach().double().flatten() for t in tensors if t.is_floating_point()])


def relative_l2(output: object, reference: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(flat_output(output) - reference) / torch.linalg.vector_norm(reference)).item()


def fp64_reference(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """Eager fp64 output of the same weights on the same (upcast) inputs."""
    model64 = copy.deepcopy(model).to(torch.float64)
    inputs64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    return flat_output(model64(*inputs64))


def median_call_ms(fn: Callable, inputs: tuple, iters: int, device: str) -> float:
    """Median milliseconds per call over `iters` calls, after WARMUP_CALLS untimed ones."""
    for _ in range(WARMUP_CALLS):
        fn(*inputs)
    synchronize(device)
    if device == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn(*inputs)
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in pairs)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_call_seconds(fn: Callable, inputs: tuple, device: str) -> tuple[float, object]:
    """Wall seconds of the first call (compilation included) and its output."""
    synchronize(device)
    start = time.perf_counter()
    output = fn(*inputs)
    synchronize(device)
    return time.perf_counter() - start, output


# --- in-process measurements ------------------------------------------------------------------

def measure_in_process(model_name: str, dtype: torch.dtype, args: argparse.Namespace) -> list[dict]:
    """Time per call and error vs fp64 of every backend on one (model, dtype)."""
    model, inputs = build(model_name, dtype, args)
    reference = fp64_reference(model, inputs)
    rows = []
    for backend in BACKENDS:
        torch._dynamo.reset()
        flagtree.clear_reports()
        fn = compiled(model, backend, args.mode)
        _, output = first_call_seconds(fn, inputs, args.device)
        error = relative_l2(output, reference)
        row = {
            "model": model_name,
            "dtype": str(dtype).removeprefix("torch."),
            "backend": backend,
            "ms_per_call": median_call_ms(fn, inputs, args.iters, args.device),
            "rel_l2_vs_fp64": error,
            "tolerance": TOLERANCE[dtype],
            "within_tolerance": error <= TOLERANCE[dtype],
        }
        if backend == "flagtree":
            row["flagtree_backend"] = flagtree_backend_name()
        rows.append(row)
    return rows


def flagtree_backend_name() -> str:
    reports = flagtree.reports()
    if not reports:
        raise RuntimeError("flagtree compiled no graph: torch.compile(backend='flagtree') produced no report")
    return reports[-1].backend


# --- compile times in fresh subprocesses ------------------------------------------------------

def probe_first_call(args: argparse.Namespace) -> None:
    """Child-process entry: print the first-call seconds of one (model, dtype, backend) as JSON."""
    model, inputs = build(args.models[0], DTYPES[args.dtypes[0]], args)
    seconds, _ = first_call_seconds(compiled(model, args.probe_backend), inputs, args.device)
    print(json.dumps({"first_call_s": seconds}))


def run_probe(model_name: str, dtype_name: str, backend: str, cache_root: Path, args: argparse.Namespace) -> float:
    """First-call seconds of `backend` in a fresh Python process using the caches under `cache_root`."""
    env = dict(os.environ)
    env["FLAGTREE_CACHE_DIR"] = str(cache_root / "flagtree")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    command = [
        sys.executable, str(Path(__file__).resolve()), "--probe-backend", backend,
        "--models", model_name, "--dtypes", dtype_name, "--device", args.device,
        "--batch", str(args.batch), "--seq", str(args.seq),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"compile-time probe {backend} on {model_name}/{dtype_name} failed (exit {done.returncode}):\n"
            f"{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])["first_call_s"]


def measure_compile_times(model_name: str, dtype_name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Cold and warm first-call seconds per compiled backend, each in its own empty cache."""
    times = {}
    for backend in COMPILED_BACKENDS:
        with tempfile.TemporaryDirectory(prefix=f"models-bench-{backend}-") as cache_root:
            cold = run_probe(model_name, dtype_name, backend, Path(cache_root), args)
            warm = run_probe(model_name, dtype_name, backend, Path(cache_root), args)
        times[backend] = {"cold_compile_s": cold, "warm_compile_s": warm}
    return times


# --- reporting --------------------------------------------------------------------------------

def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def ratios(rows: list[dict]) -> list[dict]:
    """flagtree/eager and flagtree/inductor time per call, flagtree/inductor cold compile, per (model, dtype)."""
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["model"], row["dtype"]), {})[row["backend"]] = row
    result = []
    for (model_name, dtype_name), backends in by_key.items():
        flag, eager, inductor = backends["flagtree"], backends["eager"], backends["inductor"]
        result.append({
            "model": model_name,
            "dtype": dtype_name,
            "flagtree_over_eager_time": ratio(flag["ms_per_call"], eager["ms_per_call"]),
            "flagtree_over_inductor_time": ratio(flag["ms_per_call"], inductor["ms_per_call"]),
            "flagtree_over_inductor_cold_compile": ratio(flag.get("cold_compile_s"), inductor.get("cold_compile_s")),
        })
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(rows: list[dict], ratio_rows: list[dict]) -> None:
    header = (f"{'model':<18} {'dtype':<9} {'backend':<9} {'ms/call':>9} {'rel L2 vs fp64':>15} {'ok':>4} "
              f"{'cold s':>8} {'warm s':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<18} {row['dtype']:<9} {row['backend']:<9} {row['ms_per_call']:>9.3f} "
              f"{row['rel_l2_vs_fp64']:>15.2e} {'yes' if row['within_tolerance'] else 'NO':>4} "
              f"{fmt(row.get('cold_compile_s'), '8.2f'):>8} {fmt(row.get('warm_compile_s'), '8.2f'):>8}")
    print()
    header = f"{'model':<18} {'dtype':<9} {'ft/eager time':>14} {'ft/inductor time':>17} {'ft/inductor cold':>17}"
    print(header)
    print("-" * len(header))
    for row in ratio_rows:
        print(f"{row['model']:<18} {row['dtype']:<9} {fmt(row['flagtree_over_eager_time'], '14.2f'):>14} "
              f"{fmt(row['flagtree_over_inductor_time'], '17.2f'):>17} "
              f"{fmt(row['flagtree_over_inductor_cold_compile'], '17.2f'):>17}")


def environment(args: argparse.Namespace, flagtree_backends: set[str]) -> dict:
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "mode": args.mode,
        "warmup_calls": WARMUP_CALLS,
        "flagtree_backends": sorted(flagtree_backends),
    }


# --- command line -----------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--batch", type=int, help="default 8 on cuda, 4 on cpu")
    parser.add_argument("--seq", type=int, default=MAX_SEQ, help=f"at most {MAX_SEQ} (the zoo's rotary tables)")
    parser.add_argument("--iters", type=int, default=100, help="timed calls per backend")
    parser.add_argument("--mode", choices=("default", "reduce-overhead"), default=None,
                        help="torch.compile's mode for both compiled backends (reduce-overhead: CUDA graphs)")
    parser.add_argument("--no-compile-times", action="store_true", help="skip the cold/warm subprocess probes")
    parser.add_argument("--probe-backend", choices=COMPILED_BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtypes = args.dtypes.split(",")
    args.models = args.models.split(",")
    if args.batch is None:
        args.batch = 8 if args.device == "cuda" else 4
    for dtype_name in args.dtypes:
        if dtype_name not in DTYPES:
            parser.error(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    for model_name in args.models:
        if model_name not in MODELS:
            parser.error(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
    if not 1 <= args.seq <= MAX_SEQ:
        parser.error(f"--seq must be in 1..{MAX_SEQ}: the zoo's rotary tables hold {MAX_SEQ} positions")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; pass --device cpu")
    return args


def main() -> int:
    args = parse_args()
    with torch.no_grad():
        if args.probe_backend:
            probe_first_call(args)
            return 0
        rows = []
        for model_name in args.models:
            for dtype_name in args.dtypes:
                measured = measure_in_process(model_name, DTYPES[dtype_name], args)
                if not args.no_compile_times:
                    compile_times = measure_compile_times(model_name, dtype_name, args)
                    for row in measured:
                        row.update(compile_times.get(row["backend"], {}))
                rows.extend(measured)
    ratio_rows = ratios(rows)
    flagtree_backends = {row["flagtree_backend"] for row in rows if "flagtree_backend" in row}
    print(f"device {args.device}, batch {args.batch}, seq {args.seq}, mode {args.mode or 'default'}, "
          f"{args.iters} timed calls, "
          f"flagtree backend: {', '.join(sorted(flagtree_backends))}\n")
    print_tables(rows, ratio_rows)
    report = {"environment": environment(args, flagtree_backends), "results": rows, "ratios": ratio_rows}
    out_path = Path(os.environ.get("OUT", ".")) / "models.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    failures = [row for row in rows if not row["within_tolerance"]]
    for row in failures:
        print(f"OUT OF TOLERANCE: {row['model']} {row['dtype']} {row['backend']}: rel L2 "
              f"{row['rel_l2_vs_fp64']:.2e} > {row['tolerance']:.1e}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
