"""The shared harness of `benchmarks/ops/bench_<op>.py`.

On a GPU: for each shape and each variant (fasttune's Triton op, PyTorch eager, `torch.compile` of the
reference, Liger-Kernel where installed), median milliseconds of forward, backward and both, from
`triton.testing.do_bench` (warm-up and repetitions included, CUDA-synchronised), and the peak memory a
forward + backward allocates above its inputs: `fasttune.ops.timing.time_op`, the op-timing harness
`fasttune profile --op` uses too. All variants run in one process on the same inputs; the
JSON records ratios to eager and to compiled, and is stamped with the GPU, versions and commit.

`--smoke` runs every variant once on tiny CPU shapes (Triton through its interpreter) and measures
nothing: it keeps the scripts working in CI, where there is no GPU.
"""

from __future__ import annotations

import os
import sys

# --smoke runs the Triton ops through the interpreter on the CPU; that must be chosen before anything
# imports triton, so bench scripts import this module first.
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttune.bench.report import stamp
from fasttune.ops.timing import run_once, time_op

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass
class Case:
    """One shape: `make()` returns the input tensors (those to differentiate have requires_grad set)."""

    name: str
    make: Callable[[], list[torch.Tensor]]


def measure(fn: Callable, inputs: list[torch.Tensor], smoke: bool) -> dict:
    """One variant on one case: with --smoke one forward and backward, nothing timed; on a GPU fasttune's
    op-timing harness (the one `fasttune profile --op` uses), with the backward alone and peak memory."""
    if smoke:
        run_once(fn, inputs)
        return {"ran": True}
    return time_op(fn, inputs, cuda=True, backward=True, memory=True)


def run(
    op: str, cases: list[Case], variants: dict[str, Callable | None], argv: list[str] | None = None
) -> dict:
    """Measure every variant on every case; print a table; write JSON under benchmarks/results/."""
    parser = argparse.ArgumentParser(description=f"benchmark {op}")
    parser.add_argument("--smoke", action="store_true", help="run once on tiny CPU shapes, measure nothing")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<gpu>/ops/<op>.json)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            f"bench {op}: no CUDA device; these timings need a GPU (use --smoke to check the script)"
        )
    results = {"op": op, **stamp(), "cases": {}}
    if results["gpu"] == "cpu":  # only --smoke runs without CUDA
        results["gpu"] = "cpu (smoke: nothing measured)"
    for case in cases:
        row = {}
        for name, fn in variants.items():
            if fn is None:
                row[name] = {"skipped": "not installed"}
                continue
            inputs = case.make()
            try:
                row[name] = measure(fn, inputs, args.smoke)
            except Exception as e:  # a variant that cannot run this shape says why; the others still run
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        for base in ("eager", "compiled"):
            b = row.get(base, {}).get("forward_backward_ms")
            if b:
                for r in row.values():
                    if r.get("forward_backward_ms"):
                        r[f"speedup_vs_{base}"] = round(b / r["forward_backward_ms"], 3)
        results["cases"][case.name] = row
        print(
            f"{op} {case.name}: "
            + "; ".join(
                f"{n} "
                + (
                    f"{r['forward_backward_ms']:.3f} ms, {r['peak_extra_mib']:.0f} MiB"
                    if r.get("forward_backward_ms")
                    else str(r)
                )
                for n, r in row.items()
            ),
            flush=True,
        )
    if not args.smoke:
        out = args.out or RESULTS / results["gpu"].replace(" ", "_") / "ops" / f"{op}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results


def device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def liger(name: str):
    """A Liger-Kernel function by module path and attribute ('module:attr'), or None when not installed."""
    module, _, attr = name.partition(":")
    try:
        mod = __import__(module, fromlist=[attr])
    except ImportError:
        return None
    return getattr(mod, attr, None)
