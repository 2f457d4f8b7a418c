"""Benchmark RMSNorm: fasttune's Triton kernel against PyTorch eager, torch.compile and Liger-Kernel, at
Qwen2.5-0.5B's hidden size (H = 896) in bf16; then the same with the residual add fused in.

    python benchmarks/ops/bench_rms_norm.py            # on a GPU: timings and peak memory as JSON
    python benchmarks/ops/bench_rms_norm.py --smoke    # tiny CPU shapes through the interpreter
"""

from __future__ import annotations

import sys

import harness  # first: with --smoke it selects Triton's interpreter before triton loads
import torch

from fasttune.ops.rms_norm import rms_norm, rms_norm_ref

EPS = 1e-6
SMOKE = "--smoke" in sys.argv
DEVICE = harness.device(SMOKE)
H = 64 if SMOKE else 896
TOKENS = [8] if SMOKE else [4096, 16384, 32768]
DTYPE = torch.bfloat16


def cases(residual: bool) -> list[harness.Case]:
    def make(tokens):
        def inputs():
            x = torch.randn(tokens, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
            w = (1 + 0.2 * torch.randn(H, device=DEVICE)).to(DTYPE).requires_grad_()
            if not residual:
                return [x, w]
            return [x, w, torch.randn(tokens, H, device=DEVICE, dtype=DTYPE, requires_grad=True)]

        return inputs

    return [harness.Case(f"{t}x{H} {str(DTYPE).removeprefix('torch.')}", make(t)) for t in TOKENS]


def fasttune(x, w, r=None):
    return rms_norm(x, w, EPS, r)


def eager(x, w, r=None):
    return rms_norm_ref(x, w, EPS, r)


def liger_variant(residual: bool):
    """Liger's functions adapted to (x, w[, r]) -> y[, h]. casting_mode="llama" is the model's numerics
    (xhat rounded to x's dtype before the weight multiply); offset 0 (not Gemma's 1 + w)."""
    if residual:
        fn = harness.liger("liger_kernel.ops.fused_add_rms_norm:LigerFusedAddRMSNormFunction")
        return None if fn is None else (lambda x, w, r: fn.apply(x, r, w, EPS, 0.0, "llama"))
    fn = harness.liger("liger_kernel.ops.rms_norm:LigerRMSNormFunction")
    return None if fn is None else (lambda x, w: fn.apply(x, w, EPS, 0.0, "llama"))


def main():
    for residual in (False, True):
        harness.run(
            "rms_norm_residual" if residual else "rms_norm",
            cases(residual),
            {
                "fasttune": fasttune,
                "eager": eager,
                "compiled": torch.compile(eager),
                "liger": liger_variant(residual),
            },
        )


if __name__ == "__main__":
    main()
