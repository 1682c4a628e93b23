"""Time and check attention's backward: flagtree's kernels against SDPA's backends.

    python benchmarks/attention_backward.py           # one CUDA GPU, ~2 minutes on an H200
    python benchmarks/attention_backward.py --quick   # tiny shapes on the CPU (interpret backend): a smoke test

Cases (issue 4): causal bf16, batch 1, 16 heads × 128, lengths 4096 and 16384; MLA prefill,
128 heads, qk 192 / v 128, length 4096, causal.  The model is F.scaled_dot_product_attention
with is_causal (in training, flagtree imports it as ft.attention + ft.attention_grad), and the
explicit spelling of the forward benchmark.
For each case, in one run, the backward alone (`torch.autograd.grad(out, (q, k, v), grad,
retain_graph=True)` after one forward) of:

- torch.compile(backend="flagtree") on the SDPA call, with whether its graphs hold an
  ft.attention and an ft.attention_grad (flagtree.reports());
- torch.compile with flagtree and with Inductor on the explicit spelling (benchmarks/attention.py's
  `softmax(masked_fill(q·kᵀ·scale, triu, -inf), dtype=f32).to(bf16) @ v`; flagtree fuses it
  before aot_autograd: frontend/explicit_attention.py);
- flagtree's backward kernels called directly (backends/triton/attention_backward.py);
- eager SDPA with each backend that runs the case (FLASH, EFFICIENT, CUDNN), and the best;
- torch.compile's default backend (Inductor), which keeps SDPA's kernels;
- the floor: the backward's five products over the visible query-key pairs (q·kᵀ again,
  grad_out·vᵀ, pᵀ·grad_out, grad_s·k, grad_sᵀ·q) over the bf16 matrix rate measured now.

Each method's gradients of the first two heads are compared with fp64 autograd through
ft.attention's reference (relative L2; bf16 tolerance 1.6e-2).  Prints a table and writes JSON
to $OUT/attention_backward.json (or ./attention_backward.json).  Exits 1 when a flagtree
gradient is outside its tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import flagtree
from benchmarks.attention import explicit_causal, machine_rates, measure_checked
from flagtree.ir.ops.attention import attention_reference, visible_keys

TOLERANCE = 1.6e-2
CHECKED_HEADS = 2
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    length: int
    head_dqk: int
    head_dv: int


CASES = (Case("causal 16x128 L4096", 16, 4096, 128, 128), Case("causal 16x128 L16384", 16, 16384, 128, 128),
         Case("MLA 128x(192/128) L4096", 128, 4096, 192, 128))
QUICK_CASES = (Case("causal 2x64 L80", 2, 80, 64, 64), Case("MLA 2x(48/32) L40", 2, 40, 48, 32))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return explicit_causal(q, k, v, q.shape[-1] ** -0.5)


def make_inputs(case: Case, device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = ((1, case.heads, case.length, case.head_dqk),) * 2 + ((1, case.heads, case.length, case.head_dv),)
    q, k, v = (torch.randn(s, generator=generator, device=device, dtype=torch.bfloat16).requires_grad_()
               for s in shapes)
    grad = torch.randn(1, case.heads, case.length, case.head_dv, generator=generator, device=device,
                       dtype=torch.bfloat16)
    return q, k, v, grad


def exact_gradients(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """fp64 gradients of the first CHECKED_HEADS heads (heads are independent without GQA)."""
    q, k, v, grad = (t[:, :CHECKED_HEADS].detach().double() for t in inputs)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    attrs = {"scale": q.shape[-1] ** -0.5, "causal": "upper_left", "window": 0, "has_mask": False,
             "has_sinks": False}
    return list(torch.autograd.grad(attention_reference(leaves, attrs, []), leaves, grad))


def floor_flops(case: Case) -> float:
    pairs = visible_keys(case.length, case.length, "upper_left", 0).sum().item()
    return 2.0 * case.heads * pairs * (3 * case.head_dqk + 2 * case.head_dv)


def backward_of(forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], list]:
    """One forward now; the returned call runs the backward alone."""
    q, k, v, grad = inputs
    out = forward(q, k, v)
    return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)


def sdpa_with(backend: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return attention(q, k, v)

    return run


def flagtree_kernel_backward(inputs: tuple[torch.Tensor, ...], device: str) -> Callable[[], list]:
    """flagtree's forward kernel once (out and lse), then its backward kernels alone."""
    from flagtree.backends.registry import get_backend
    from flagtree.backends.triton.attention import flash_attention
    from flagtree.backends.triton.attention_backward import flash_attention_backward

    backend = get_backend("cuda" if device == "cuda" else "interpret")
    caps = backend.capabilities()
    q, k, v, grad = (t.detach() for t in inputs)
    kwargs = {"scale": q.shape[-1] ** -0.5, "causal": "upper_left", "window": 0}
    out, lse = flash_attention(backend.name, backend.jit, caps)(q, k, v, **kwargs, with_lse=True)
    kernels = flash_attention_backward(backend.name, backend.jit, caps)
    return lambda: kernels(q, k, v, out, grad, lse, **kwargs)


def measure(label: str, prepare: Callable[[], Callable[[], list]], expected: list[torch.Tensor],
            device: str) -> dict:
    """Prepare (forward, compile), run the backward once and check its gradients (the worst of
    the first heads' relative errors), then time it."""
    def error_of(grads: list[torch.Tensor]) -> float:
        return max(((g[:, :CHECKED_HEADS].double() - e).norm() / e.norm()).item() for g, e in zip(grads, expected))

    return measure_checked(label, prepare, error_of, device)


def run_case(case: Case, device: str) -> dict:
    print(case.name, flush=True)
    inputs = make_inputs(case, device)
    expected = exact_gradients(inputs)
    options = {} if device == "cuda" else {"target": "interpret"}
    torch._dynamo.reset()
    flagtree.clear_reports()
    methods = {"flagtree": measure("flagtree (torch.compile)", lambda: backward_of(
        torch.compile(attention, backend="flagtree", options=options), inputs), expected, device)}
    fusions = {name: n for report in flagtree.reports() for name, n in report.fusions.items()}
    methods["flagtree"]["fused"] = fusions.get("attention", 0) > 0 and fusions.get("attention_grad", 0) > 0
    methods["flagtree"]["kernel_fallbacks"] = {k: n for r in flagtree.reports() for k, n in r.kernel_fallbacks.items()}
    torch._dynamo.reset()
    flagtree.clear_reports()
    methods["flagtree explicit"] = measure("flagtree explicit (torch.compile)", lambda: backward_of(
        torch.compile(explicit, backend="flagtree", options=options), inputs), expected, device)
    kinds = {kind for report in flagtree.reports() for kind in report.fusions}
    methods["flagtree explicit"]["fused"] = {"attention", "attention_grad"} <= kinds
    methods["flagtree kernel"] = measure("flagtree kernels", lambda: flagtree_kernel_backward(inputs, device),
                                         expected, device)
    if device == "cuda":
        for backend in SDPA_BACKENDS:
            methods[f"sdpa {backend}"] = measure(f"sdpa {backend}", lambda b=backend: backward_of(
                sdpa_with(b), inputs), expected, device)
        torch._dynamo.reset()
        methods["inductor"] = measure("inductor", lambda: backward_of(torch.compile(attention), inputs), expected,
                                      device)
        torch._dynamo.reset()
        methods["inductor explicit"] = measure("inductor explicit", lambda: backward_of(torch.compile(explicit),
                                                                                       inputs), expected, device)
    return {"case": asdict(case), "flops": floor_flops(case), "methods": methods}


def summarize(row: dict, rates: dict) -> dict:
    methods = row["methods"]
    timed = {name: m["ms"] for name, m in methods.items() if "ms" in m}
    sdpa = {name: ms for name, ms in timed.items() if name.startswith("sdpa")}
    floor_ms = row["flops"] / (rates["bf16_matmul_tflops"] * 1e9)
    best_sdpa = min(sdpa, key=sdpa.get) if sdpa else None
    flagtree_ms = timed.get("flagtree")
    return {
        "floor_ms": floor_ms,
        "best_sdpa": best_sdpa,
        "sdpa_over_flagtree": sdpa[best_sdpa] / flagtree_ms if best_sdpa and flagtree_ms else None,
        "flagtree_of_floor": floor_ms / flagtree_ms if flagtree_ms else None,
    }


def print_table(report: dict) -> None:
    columns = ("flagtree", "flagtree kernel", "inductor", *(f"sdpa {b}" for b in SDPA_BACKENDS),
               "flagtree explicit", "inductor explicit")
    print("\nbackward, µs (median):")
    print(f"{'case':<26}" + "".join(f"{c[:16]:>17}" for c in columns) + f"{'floor':>9}{'SDPA/ft':>9}{'of floor':>9}")
    for row in report["cases"]:
        cells = "".join(f"{row['methods'][c]['ms'] * 1e3:17.1f}" if "ms" in row["methods"].get(c, {}) else
                        f"{'-':>17}" for c in columns)
        s = row["summary"]
        ratio = f"{s['sdpa_over_flagtree']:9.2f}" if s["sdpa_over_flagtree"] else f"{'-':>9}"
        share = f"{s['flagtree_of_floor']:9.0%}" if s["flagtree_of_floor"] else f"{'-':>9}"
        print(f"{row['case']['name']:<26}{cells}{s['floor_ms'] * 1e3:9.1f}{ratio}{share}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU through the interpret backend")
    args = parser.parse_args()
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    rates = machine_rates(device)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}: "
          f"bf16 matmul {rates['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
              "torch": torch.__version__, "rates": rates, "cases": []}
    for case in QUICK_CASES if device == "cpu" else CASES:
        row = run_case(case, device)
        row["summary"] = summarize(row, rates)
        report["cases"].append(row)
    print_table(report)
    path = Path(os.environ.get("OUT", ".")) / "attention_backward.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    failed = [row["case"]["name"] for row in report["cases"]
              if any(m.get("rel_l2_vs_fp64", 0) > TOLERANCE or "error" in m
                     for name, m in row["methods"].items() if name.startswith("flagtree"))]
    if failed:
        print(f"flagtree outside tolerance or failing on: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
