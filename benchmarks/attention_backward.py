"""Time and check attention's backward: flagtree's kernels against SDPA's backends.

    python benchmarks/attention_backward.py           # one CUDA GPU, ~2 minutes on an H200
    python benchmarks/attention_backward.py --quick   # tiny shapes on the CPU (interpret backend): a smoke test

Cases (issue 4): causal bf16, batch 1, 16 heads × 128, lengths 4096 and 16384; MLA prefill,
128 heads, qk 192 / v 128, length 4096, causal; DeepSeek-V4's attention, 64 heads × 512 over
one KV head that is both K and V, window 128, per-head sinks, length 4096.  The model is
F.scaled_dot_product_attention with is_causal (in training, flagtree imports it as
ft.attention + ft.attention_grad; none for V4, whose sinks SDPA cannot express), and the
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
- the floor, the larger of: the backward's five products over the visible query-key pairs (q·kᵀ
  again, grad_out·vᵀ, pᵀ·grad_out, grad_s·k, grad_sᵀ·q) over the bf16 matrix rate, and the bytes
  it must move (q, k, v, out, grad_out in; their gradients out) over the copy bandwidth, both
  measured now.

Each method's gradients are compared with fp64 autograd through ft.attention's reference
(relative L2; bf16 tolerance 1.6e-2): those of the first two heads where heads are independent,
all of them (computed a few query heads at a time) where the query heads share one KV head.
Prints a table and writes JSON to $OUT/attention_backward.json (or ./attention_backward.json).
Exits 1 when a flagtree gradient is outside its tolerance.
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
from benchmarks.attention import explicit_causal, explicit_mqa_with_sinks, machine_rates, measure_checked
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
    mqa: bool = False  # one KV head, which is both K and V (DeepSeek-V4)
    window: int = 0
    sinks: bool = False

    @property
    def checked_heads(self) -> int:
        """The query heads whose gradients are checked: all when they share the KV head."""
        return self.heads if self.mqa else min(CHECKED_HEADS, self.heads)


CASES = (Case("causal 16x128 L4096", 16, 4096, 128, 128), Case("causal 16x128 L16384", 16, 16384, 128, 128),
         Case("MLA 128x(192/128) L4096", 128, 4096, 192, 128),
         Case("V4 MQA 64x512 K=V w128 sinks L4096", 64, 4096, 512, 512, mqa=True, window=128, sinks=True))
QUICK_CASES = (Case("causal 2x64 L80", 2, 80, 64, 64), Case("MLA 2x(48/32) L40", 2, 40, 48, 32),
               Case("V4 MQA 4x64 K=V w16 sinks L40", 4, 40, 64, 64, mqa=True, window=16, sinks=True))
REFERENCE_HEADS = 8  # query heads per fp64 reference step (the scores of 64 heads × 4096² would not fit)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def explicit(case: Case) -> Callable[..., torch.Tensor]:
    """The forward benchmark's explicit spelling of the case."""
    if case.sinks:
        return lambda q, k, v, sinks: explicit_mqa_with_sinks(q, k, sinks, q.shape[-1] ** -0.5, case.window)
    return lambda q, k, v, sinks: explicit_causal(q, k, v, q.shape[-1] ** -0.5)


def make_inputs(case: Case, device: str) -> tuple[torch.Tensor | None, ...]:
    """q, k, v (one tensor for K = V), sinks (or None) and the output gradient."""
    generator = torch.Generator(device=device).manual_seed(0)

    def leaf(heads: int, dim: int) -> torch.Tensor:
        return torch.randn(1, heads, case.length, dim, generator=generator, device=device,
                           dtype=torch.bfloat16).requires_grad_()

    q = leaf(case.heads, case.head_dqk)
    k = leaf(1, case.head_dqk) if case.mqa else leaf(case.heads, case.head_dqk)
    v = k if case.mqa else leaf(case.heads, case.head_dv)
    sinks = torch.randn(case.heads, generator=generator, device=device) if case.sinks else None
    grad = torch.randn(1, case.heads, case.length, case.head_dv, generator=generator, device=device,
                       dtype=torch.bfloat16)
    return q, k, v, sinks, grad


def attributes(case: Case) -> dict:
    return {"scale": case.head_dqk ** -0.5, "causal": "upper_left", "window": case.window, "has_mask": False,
            "has_sinks": case.sinks}


def exact_gradients(case: Case, inputs: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor]:
    """fp64 gradients of q, k, v for the case's checked heads, REFERENCE_HEADS query heads at a
    time (heads are independent given their KV head; a shared KV head sums its gradients)."""
    q, k, v, sinks, grad = inputs
    steps = []
    for first in range(0, case.checked_heads, REFERENCE_HEADS):
        heads = slice(first, min(first + REFERENCE_HEADS, case.checked_heads))
        kv_heads = slice(None) if case.mqa else heads
        leaves = [q[:, heads].detach().double().requires_grad_(), k[:, kv_heads].detach().double().requires_grad_()]
        leaves.append(leaves[1] if case.mqa else v[:, kv_heads].detach().double().requires_grad_())
        extra = [sinks[heads].double()] if sinks is not None else []
        out = attention_reference([*leaves, *extra], attributes(case), [])
        steps.append(torch.autograd.grad(out, leaves[:2] if case.mqa else leaves, grad[:, heads].double()))
    grad_q = torch.cat([step[0] for step in steps], 1)
    if case.mqa:  # K = V: one gradient for both, summed over every query head
        grad_kv = sum(step[1] for step in steps)
        return [grad_q, grad_kv, grad_kv]
    return [grad_q, *(torch.cat([step[i] for step in steps], 1) for i in (1, 2))]


def floor_ms(case: Case, rates: dict) -> float:
    """The larger of the products' time at the measured matrix rate and the bytes' at the copy bandwidth."""
    pairs = visible_keys(case.length, case.length, "upper_left", case.window).sum().item()
    flops = 2.0 * case.heads * pairs * (3 * case.head_dqk + 2 * case.head_dv)
    query_side = case.heads * case.length * (2 * case.head_dqk + 2 * case.head_dv)  # q, grad_q, out, grad_out
    key_side = (1 if case.mqa else case.heads) * case.length * (case.head_dqk + (0 if case.mqa else case.head_dv))
    moved = 2 * (query_side + 2 * key_side)  # bf16; K and V read, their gradients written
    return max(flops / (rates["bf16_matmul_tflops"] * 1e9), moved / (rates["copy_GBps"] * 1e6))


def backward_of(forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor | None, ...]) -> Callable[[], list]:
    """One forward now; the returned call runs the backward alone."""
    q, k, v, sinks, grad = inputs
    out = forward(q, k, v, sinks)
    return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)


def sdpa_with(backend: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: None) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return attention(q, k, v, sinks)

    return run


def flagtree_kernel_backward(case: Case, inputs: tuple[torch.Tensor | None, ...], device: str) -> Callable[[], list]:
    """flagtree's forward kernel once (out and lse), then its backward kernels alone (K = V: the
    two gradients summed, as autograd does)."""
    from flagtree.backends.registry import get_backend
    from flagtree.backends.triton.attention import flash_attention
    from flagtree.backends.triton.attention_backward import flash_attention_backward

    backend = get_backend("cuda" if device == "cuda" else "interpret")
    caps = backend.capabilities()
    q, k, v, grad = (t.detach() for t in (inputs[0], inputs[1], inputs[2], inputs[4]))
    sinks = inputs[3]
    kwargs = {"scale": case.head_dqk ** -0.5, "causal": "upper_left", "window": case.window}
    out, lse = flash_attention(backend.name, backend.jit, caps)(q, k, v, None, sinks, **kwargs, with_lse=True)
    kernels = flash_attention_backward(backend.name, backend.jit, caps)

    def run() -> list[torch.Tensor]:
        grad_q, grad_k, grad_v = kernels(q, k, v, out, grad, lse, None, sinks, **kwargs)[:3]
        return [grad_q, grad_k + grad_v, grad_k + grad_v] if case.mqa else [grad_q, grad_k, grad_v]

    return run


def measure(label: str, prepare: Callable[[], Callable[[], list]], case: Case, expected: list[torch.Tensor],
            device: str) -> dict:
    """Prepare (forward, compile), run the backward once and check its gradients (the worst
    relative error over the checked heads), then time it."""
    def error_of(grads: list[torch.Tensor]) -> float:  # (a shared KV head's slice is all of it)
        return max(((g[:, :case.checked_heads].double() - e).norm() / e.norm()).item()
                   for g, e in zip(grads, expected))

    return measure_checked(label, prepare, error_of, device)


def fusions_of_reports() -> dict[str, int]:
    fusions: dict[str, int] = {}
    for report in flagtree.reports():
        for kind, n in report.fusions.items():
            fusions[kind] = fusions.get(kind, 0) + n
    return fusions


def compiled(label: str, model: Callable[..., torch.Tensor], case: Case, inputs: tuple, expected: list,
             device: str) -> dict:
    """flagtree's torch.compile of `model`, timed, with whether it trained through both fused ops."""
    options = {} if device == "cuda" else {"target": "interpret"}
    torch._dynamo.reset()
    flagtree.clear_reports()
    result = measure(label, lambda: backward_of(torch.compile(model, backend="flagtree", options=options), inputs),
                     case, expected, device)
    fusions = fusions_of_reports()
    result["fused"] = fusions.get("attention", 0) > 0 and fusions.get("attention_grad", 0) > 0
    result["kernel_fallbacks"] = {k: n for r in flagtree.reports() for k, n in r.kernel_fallbacks.items()}
    return result


def run_case(case: Case, device: str) -> dict:
    print(case.name, flush=True)
    inputs = make_inputs(case, device)
    expected = exact_gradients(case, inputs)
    methods = {}
    if not case.sinks:
        methods["flagtree"] = compiled("flagtree (torch.compile)", attention, case, inputs, expected, device)
    methods["flagtree explicit"] = compiled("flagtree explicit (torch.compile)", explicit(case), case, inputs,
                                            expected, device)
    methods["flagtree kernel"] = measure("flagtree kernels", lambda: flagtree_kernel_backward(case, inputs, device),
                                         case, expected, device)
    if device == "cuda":
        if not case.sinks:
            for backend in SDPA_BACKENDS:
                methods[f"sdpa {backend}"] = measure(f"sdpa {backend}", lambda b=backend: backward_of(
                    sdpa_with(b), inputs), case, expected, device)
            torch._dynamo.reset()
            methods["inductor"] = measure("inductor", lambda: backward_of(torch.compile(attention), inputs), case,
                                          expected, device)
        torch._dynamo.reset()
        methods["inductor explicit"] = measure("inductor explicit", lambda: backward_of(
            torch.compile(explicit(case)), inputs), case, expected, device)
    return {"case": {**asdict(case), "checked_heads": case.checked_heads}, "methods": methods}


def summarize(case: Case, row: dict, rates: dict) -> dict:
    methods = row["methods"]
    timed = {name: m["ms"] for name, m in methods.items() if "ms" in m}
    sdpa = {name: ms for name, ms in timed.items() if name.startswith("sdpa")}
    floor = floor_ms(case, rates)
    best_sdpa = min(sdpa, key=sdpa.get) if sdpa else None
    flagtree_ms = timed.get("flagtree", timed.get("flagtree explicit"))
    return {
        "floor_ms": floor,
        "best_sdpa": best_sdpa,
        "sdpa_over_flagtree": sdpa[best_sdpa] / flagtree_ms if best_sdpa and flagtree_ms else None,
        "flagtree_of_floor": floor / flagtree_ms if flagtree_ms else None,
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
        row["summary"] = summarize(case, row, rates)
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
