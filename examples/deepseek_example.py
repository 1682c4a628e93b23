"""Compile a tiny DeepSeek-V3 decoder layer with flagtree and check it against eager.

    python examples/deepseek_example.py [--dtype bfloat16] [--seq 32]

Exits non-zero when the relative L2 error of the compiled output exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    # Run as a script: make `examples` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.zoo import make_deepseek_block

# Relative L2 error vs eager in the same dtype (the project's tolerances, DESIGN.md).
DEFAULT_TOL = {"float32": 1e-5, "bfloat16": 1.6e-2}
MAX_SEQ = 64  # rotary table length of the zoo models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DEFAULT_TOL), default="float32")
    p.add_argument("--seq", type=int, default=16, help=f"sequence length, 1..{MAX_SEQ}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tol", type=float, default=None, help="override the dtype's tolerance"
    )
    args = p.parse_args(argv)
    if not 1 <= args.seq <= MAX_SEQ:
        p.error(f"--seq must be in 1..{MAX_SEQ}")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def _fmt(d: dict[Any, Any]) -> str:
    if not d:
        return "-"
    return ", ".join(
        f"{k}={v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))
    )


def print_reports(reports: list[Any]) -> None:
    """One summary per compiled graph."""
    print(f"flagtree compiled {len(reports)} graph(s)")
    for i, r in enumerate(reports):
        times = {k: f"{v * 1e3:.2f}ms" for k, v in r.pass_times.items()}
        print(f"[graph {i}] backend: {r.backend}")
        print(f"  fusions:    {_fmt(r.fusions)}")
        print(f"  fallbacks:  {_fmt(r.fallbacks)}")
        print(f"  op counts:  {_fmt(r.op_counts)}")
        total_ms = sum(r.pass_times.values()) * 1e3
        print(f"  pass times: {_fmt(times)} (total {total_ms:.2f}ms)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import flagtree  # lazy: registers the "flagtree" torch.compile backend

    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    model, inputs = make_deepseek_block(
        dtype=dtype, seed=args.seed, device=args.device, batch=args.batch, seq=args.seq
    )

    with torch.no_grad():
        expected = model(*inputs)
        compiled = torch.compile(model, backend="flagtree")
        actual = compiled(*inputs)

    diff = (actual.double() - expected.double()).abs()
    max_abs = diff.max().item()
    rel_l2 = (diff.norm() / expected.double().norm().clamp_min(1e-30)).item()
    finite = bool(torch.isfinite(actual).all())
    print(
        f"DeepSeekBlock {args.dtype} batch={args.batch} seq={args.seq} "
        f"on {args.device}: max|diff|={max_abs:.3e} rel_l2={rel_l2:.3e} (tol {tol:.1e})"
    )
    print_reports(list(flagtree.reports()))

    # NaN compares false, so test "not <=" rather than ">" to fail on it.
    if not finite or not rel_l2 <= tol:
        print("FAIL: compiled output does not match eager", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
