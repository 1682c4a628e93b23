"""Time and check attention: flagtree's flash-attention kernel against eager, Inductor, SDPA and FlexAttention.

    python benchmarks/attention.py                 # one CUDA GPU, ~4 minutes on an H200
    python benchmarks/attention.py --cases causal  # only the cases whose name contains "causal"
    python benchmarks/attention.py --quick         # tiny shapes on the CPU (the interpret backend): a smoke test

Cases (issue 4): explicit causal bf16 attention, batch 1, 16 heads × 128, lengths 4096 and
16384; MLA prefill, 128 heads, qk 192 / v 128, length 4096, causal; DeepSeek-V4 MQA, 64 query
heads × 512 over one KV head that is both K and V, window 128, per-head sinks, length 4096;
and V4 decode, one query over a 65536-key cache (split-KV).  For each case, in one run:

- flagtree's kernel called directly (backends/triton/attention.py; tuned on its first call);
- torch.compile(backend="flagtree") on the explicit spelling (`softmax(q·kᵀ·scale masked with
  -inf, dtype=float32).to(bf16) @ v`, sinks as a concatenated column), with whether the compiled
  graph contains an ft.attention fusion (flagtree.reports());
- the explicit spelling eager and under torch.compile's default backend (Inductor);
- F.scaled_dot_product_attention with each SDPA backend (FLASH, EFFICIENT, CUDNN, MATH; those
  that fail are reported as such) and the best of them, where SDPA can express the case;
- FlexAttention (compiled, with a causal / sliding-window block mask; sinks folded in through
  the returned log-sum-exp);
- the floors: flops (visible query-key pairs only: causal halves them) over the bf16 matrix rate,
  and bytes (q, k, v, output once) over the copy bandwidth, both measured in this run.

Before timing, each output is compared with an fp64 evaluation of ft.attention's reference on
the first two query heads (relative L2; bf16 tolerance 1.6e-2).  Times are the median of
triton.testing.do_bench (warmup, L2 flushed); a method that fails or runs out of memory is
reported with its reason.  Prints a table and writes JSON to $OUT/attention.json (or
./attention.json).  Exits 1 when a flagtree output is outside its tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import flagtree
from flagtree.backends.triton.attention import attention_class, flash_attention
from flagtree.ir.ops.attention import attention_reference, visible_keys

TOLERANCE = 1.6e-2  # bf16, DESIGN.md
CHECKED_HEADS = 2
SPIN_UP_S = 0.3
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    q_heads: int
    kv_heads: int
    sq: int
    skv: int
    head_dqk: int
    head_dv: int
    window: int = 0
    sinks: bool = False
    kv_shared: bool = False  # K and V are one tensor (DeepSeek-V4)
    causal: str = "lower_right"


CASES = (
    Case("causal 16x128 L4096", 1, 16, 16, 4096, 4096, 128, 128),
    Case("causal 16x128 L16384", 1, 16, 16, 16384, 16384, 128, 128),
    Case("MLA prefill 128x(192/128) L4096", 1, 128, 128, 4096, 4096, 192, 128),
    Case("V4 MQA 64x512 K=V w128 sinks L4096", 1, 64, 1, 4096, 4096, 512, 512, 128, True, True),
    Case("V4 decode 64x512 K=V sinks Skv65536", 1, 64, 1, 1, 65536, 512, 512, 0, True, True),
)
QUICK_CASES = (
    Case("causal 4x64 L48", 1, 4, 4, 48, 48, 64, 64),
    Case("MLA 4x(96/64) L40", 1, 4, 4, 40, 40, 96, 64),
    Case("V4 MQA 8x128 K=V w16 sinks L40", 1, 8, 1, 40, 40, 128, 128, 16, True, True),
    Case("V4 decode 8x128 K=V sinks Skv300", 1, 8, 1, 1, 300, 128, 128, 0, True, True),
)


# --- the explicit spellings ---------------------------------------------------------------------

def explicit_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention as written in model code: a triu mask, masked_fill, fp32 softmax."""
    scores = (q @ k.transpose(-1, -2)) * scale
    hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def explicit_mqa_with_sinks(q: torch.Tensor, kv: torch.Tensor, sinks: torch.Tensor, scale: float,
                            window: int) -> torch.Tensor:
    """DeepSeek-V4's attention: one KV head broadcast over the query heads, K = V, a sliding
    window from arange comparisons (none when window = 0), a sink logit column per head."""
    scores = (q @ kv.transpose(-1, -2)) * scale
    sq, skv = q.shape[-2], kv.shape[-2]
    if window:
        i = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        j = torch.arange(skv, device=q.device)[None, :]
        scores = scores.masked_fill((j > i) | (i - j >= window), float("-inf"))
    sink_column = sinks.view(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
    probabilities = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1, dtype=torch.float32)
    return probabilities[..., :-1].to(q.dtype) @ kv


def explicit(case: Case) -> Callable[..., torch.Tensor]:
    if case.sinks:
        return lambda q, k, v, sinks, scale: explicit_mqa_with_sinks(q, k, sinks, scale, case.window)
    return lambda q, k, v, sinks, scale: explicit_causal(q, k, v, scale)


# --- inputs, reference, floors ------------------------------------------------------------------

def make_inputs(case: Case, device: str) -> tuple[torch.Tensor, ...]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    q = randn(case.batch, case.q_heads, case.sq, case.head_dqk)
    k = randn(case.batch, case.kv_heads, case.skv, case.head_dqk)
    v = k if case.kv_shared else randn(case.batch, case.kv_heads, case.skv, case.head_dv)
    sinks = torch.randn(case.q_heads, device=device) if case.sinks else None
    return q, k, v, sinks


def attributes(case: Case, scale: float) -> dict:
    return {"scale": scale, "causal": case.causal, "window": case.window, "has_mask": False,
            "has_sinks": case.sinks}


def reference_slice(case: Case, inputs: tuple, scale: float) -> torch.Tensor:
    """fp64 ft.attention on the first CHECKED_HEADS query heads (and the KV heads they read)."""
    q, k, v, sinks = inputs
    heads = min(CHECKED_HEADS, case.q_heads)
    kv_heads = max(1, heads * case.kv_heads // case.q_heads)
    args = [q[:, :heads].double(), k[:, :kv_heads].double(), v[:, :kv_heads].double()]
    if sinks is not None:
        args.append(sinks[:heads].double())
    return attention_reference(args, attributes(case, scale), [])


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    actual = out[:, :expected.shape[1]].double()
    return ((actual - expected).norm() / expected.norm()).item()


def work(case: Case, device: str) -> tuple[float, float]:
    """Flops of the visible query-key pairs and the bytes a fused kernel must move."""
    pairs = visible_keys(case.sq, case.skv, case.causal, case.window, torch.device(device)).sum().item()
    flops = 2.0 * case.batch * case.q_heads * pairs * (case.head_dqk + case.head_dv)
    elements = case.batch * (case.q_heads * case.sq * (case.head_dqk + case.head_dv)
                             + case.kv_heads * case.skv * (case.head_dqk + (0 if case.kv_shared else case.head_dv)))
    return flops, 2.0 * elements


# --- timing -------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        import triton.testing

        spin_up(fn)
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def spin_up(fn: Callable[[], object]) -> None:
    """Run `fn` on the GPU for SPIN_UP_S before timing it: the GPU idles while a method compiles and
    may clock down, and with do_bench's short warmup alone a compiled method timed right after its
    compile measured up to 1.7x the time of the same kernels timed after another method (H200)."""
    deadline = time.perf_counter() + SPIN_UP_S
    while time.perf_counter() < deadline:
        fn()
        torch.cuda.synchronize()


def machine_rates(device: str) -> dict:
    """The bf16 matrix rate and the copy bandwidth of this device, measured now."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matrix_ms = time_ms(lambda: a @ a, device)
    source = torch.empty(2**30 if device == "cuda" else 2**24, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), device)
    return {"bf16_matmul_tflops": 2 * n**3 / matrix_ms / 1e9, "copy_GBps": 2 * source.numel() / copy_ms / 1e6}


def measure(label: str, fn: Callable[[], torch.Tensor], expected: torch.Tensor, device: str) -> dict:
    """Run once (compiling, tuning), check against `expected`, then time; errors are recorded."""
    return measure_checked(label, lambda: fn, lambda out: relative_error(out, expected), device)


def measure_checked(label: str, prepare: Callable[[], Callable[[], Any]], error_of: Callable[[Any], float],
                    device: str) -> dict:
    """`prepare()` (a forward, a compile) gives the call to time: run it once (compiling,
    tuning), record `error_of` its result, then time it; a failure is recorded and printed."""
    try:
        start = time.perf_counter()
        run = prepare()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        error = error_of(out)
        del out
        result = {"first_call_s": first_s, "rel_l2_vs_fp64": error, "ms": time_ms(run, device)}
    except Exception as e:  # OOM, a backend that cannot run this case, a compile failure: reported, not fatal
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"  {label:<34} " + (f"{result['ms'] * 1e3:10.1f} us  err {result['rel_l2_vs_fp64']:.1e}"
                               if "ms" in result else result["error"]), flush=True)
    return result


# --- the methods --------------------------------------------------------------------------------

def flagtree_kernel(device: str):
    """flagtree's FlashAttention object for `device` (cuda, else the interpret backend)."""
    from flagtree.backends.registry import get_backend

    backend = get_backend("cuda" if device == "cuda" else "interpret")
    return flash_attention(backend.name, backend.jit, backend.capabilities())


def compiled_flagtree(fn: Callable, device: str) -> Callable:
    options = {} if device == "cuda" else {"target": "interpret"}
    return torch.compile(fn, backend="flagtree", options=options)


def sdpa(case: Case, inputs: tuple, scale: float, backend: str) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = inputs

    def run() -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal != "none" and case.sq > 1,
                                                  scale=scale, enable_gqa=case.kv_heads != case.q_heads)

    return run


def flex(case: Case, inputs: tuple, scale: float, device: str) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, sinks = inputs
    offset = case.skv - case.sq if case.causal == "lower_right" else 0

    def visible(b, h, q_index, kv_index):
        seen = q_index + offset >= kv_index
        return seen & (q_index + offset - kv_index < case.window) if case.window else seen

    block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=case.sq, KV_LEN=case.skv, device=device)
    attend = torch.compile(flex_attention)
    gqa = case.kv_heads != case.q_heads

    def run() -> torch.Tensor:
        if sinks is None:
            return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        out, lse = attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
        # the sink joins the denominator: out · Σ/(Σ + e^sink) = out · sigmoid(lse - sink)
        return (out * torch.sigmoid(lse - sinks.view(1, -1, 1))[..., None]).to(q.dtype)

    return run


def run_case(case: Case, device: str, attention) -> dict:
    print(f"\n{case.name}", flush=True)
    torch._dynamo.reset()
    inputs = make_inputs(case, device)
    q, k, v, sinks = inputs
    scale = case.head_dqk ** -0.5
    expected = reference_slice(case, inputs, scale)
    flops, moved = work(case, device)
    spelled = explicit(case)
    results: dict[str, dict] = {}
    results["flagtree kernel"] = measure(
        "flagtree kernel", lambda: attention(q, k, v, None, sinks, scale=scale, causal=case.causal,
                                             window=case.window), expected, device)
    chosen = attention._chosen.get(attention_class(q, k, v, case.causal, case.window, False))
    flagtree.clear_reports()
    compiled = compiled_flagtree(spelled, device)
    results["flagtree torch.compile"] = measure("flagtree torch.compile", lambda: compiled(q, k, v, sinks, scale),
                                                expected, device)
    fusions: dict[str, int] = {}
    for report in flagtree.reports():
        for name, count in report.fusions.items():
            fusions[name] = fusions.get(name, 0) + count
    results["flagtree torch.compile"]["fusions"] = fusions
    results["eager"] = measure("eager", lambda: spelled(q, k, v, sinks, scale), expected, device)
    inductor = torch.compile(spelled)
    results["inductor"] = measure("torch.compile (Inductor)", lambda: inductor(q, k, v, sinks, scale), expected, device)
    if not case.sinks:  # SDPA has no sink logits
        for backend in SDPA_BACKENDS:
            results[f"SDPA {backend}"] = measure(f"SDPA {backend}", sdpa(case, inputs, scale, backend), expected,
                                                 device)
    try:
        flex_run = flex(case, inputs, scale, device)
        results["FlexAttention"] = measure("FlexAttention", flex_run, expected, device)
    except Exception as e:  # block-mask construction or an unsupported shape
        results["FlexAttention"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        print(f"  {'FlexAttention':<34} {results['FlexAttention']['error']}")
    return {"case": asdict(case), "flops": flops, "bytes": moved, "flagtree_config": str(chosen),
            "results": results}


def summarize(row: dict, rates: dict) -> dict:
    """Floors and ratios of one case."""
    results = row["results"]
    flop_floor_ms = row["flops"] / (rates["bf16_matmul_tflops"] * 1e9)
    byte_floor_ms = row["bytes"] / (rates["copy_GBps"] * 1e6)
    sdpa = {name: r["ms"] for name, r in results.items() if name.startswith("SDPA") and "ms" in r}
    best_sdpa = min(sdpa, key=sdpa.get) if sdpa else None
    kernel_ms = results["flagtree kernel"].get("ms")
    summary = {"flop_floor_ms": flop_floor_ms, "byte_floor_ms": byte_floor_ms,
               "floor_ms": max(flop_floor_ms, byte_floor_ms), "best_sdpa": best_sdpa,
               "best_sdpa_ms": sdpa.get(best_sdpa)}
    if kernel_ms:
        summary["flagtree_tflops"] = row["flops"] / kernel_ms / 1e9
        summary["flagtree_of_flop_floor"] = flop_floor_ms / kernel_ms
        summary["flagtree_of_floor"] = summary["floor_ms"] / kernel_ms
        if best_sdpa:
            summary["flagtree_speed_vs_best_sdpa"] = sdpa[best_sdpa] / kernel_ms
    return summary


def print_table(report: dict) -> None:
    machine = report["machine"]
    print(f"\n{machine['device']}  torch {machine['torch']}  triton {machine['triton']}  {report['date']}")
    rates = report["rates"]
    print(f"bf16 matmul {rates['bf16_matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_GBps']:.0f} GB/s\n")

    def cell(result: dict | None) -> str:
        return "n/a" if result is None else f"{result['ms'] * 1e3:.0f}" if "ms" in result else "fail"

    header = (f"{'case (times in us)':<38} {'flagtree':>8} {'ft.compile':>10} {'fused':>5} {'eager':>8} "
              f"{'inductor':>8} {'best SDPA':>18} {'flex':>8} {'floor':>12} {'vs SDPA':>7} {'of floor':>8}")
    print(header)
    for row in report["cases"]:
        r, s = row["results"], row["summary"]
        fused = "yes" if r["flagtree torch.compile"].get("fusions", {}).get("attention") else "no"
        best = f"{cell(r[s['best_sdpa']])} {s['best_sdpa'][5:10]}" if s["best_sdpa"] else "n/a"
        floor = f"{s['flop_floor_ms'] * 1e3:.0f}f/{s['byte_floor_ms'] * 1e3:.0f}b"
        versus = f"{s['flagtree_speed_vs_best_sdpa']:.2f}x" if "flagtree_speed_vs_best_sdpa" in s else "n/a"
        of_floor = f"{s['flagtree_of_floor']:.0%}" if "flagtree_of_floor" in s else "n/a"
        print(f"{row['case']['name']:<38} {cell(r['flagtree kernel']):>8} {cell(r['flagtree torch.compile']):>10} "
              f"{fused:>5} {cell(r['eager']):>8} {cell(r['inductor']):>8} {best:>18} {cell(r.get('FlexAttention')):>8} "
              f"{floor:>12} {versus:>7} {of_floor:>8}")
    print("\nfloor: flops over the bf16 matrix rate (f) / bytes over the copy bandwidth (b); 'of floor' is the "
          "larger floor over flagtree's time; 'vs SDPA' is best SDPA time over flagtree's.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU through the interpret backend")
    parser.add_argument("--cases", default="", help="run only the cases whose name contains this text")
    options = parser.parse_args()
    device = "cpu" if options.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; use --quick for a CPU smoke test", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    import triton

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "triton": triton.__version__, "flagtree": flagtree.__version__,
                    "python": platform.python_version()},
        "rates": machine_rates(device),
        "cases": [],
    }
    attention = flagtree_kernel(device)
    report["machine"]["capabilities"] = attention.caps.describe()
    failed = False
    for case in QUICK_CASES if options.quick else CASES:
        if options.cases not in case.name:
            continue
        with torch.no_grad():
            row = run_case(case, device, attention)
        row["summary"] = summarize(row, report["rates"])
        report["cases"].append(row)
        for method in ("flagtree kernel", "flagtree torch.compile"):  # the kernel must run; a compile may fail
            error = row["results"][method].get("rel_l2_vs_fp64", math.inf if method == "flagtree kernel" else 0.0)
            failed |= not math.isfinite(error) or error > TOLERANCE
    print_table(report)
    out_dir = Path(os.environ.get("OUT", "."))
    path = out_dir / "attention.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
