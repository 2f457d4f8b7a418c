"""Benchmark SwiGLU's gating, silu(gate) * up: fasttune's Triton kernel against PyTorch eager,
torch.compile and Liger-Kernel, at Qwen2.5-0.5B's intermediate size (I = 4864) in bf16.

    python benchmarks/ops/bench_swiglu.py            # on a GPU: timings and peak memory as JSON
    python benchmarks/ops/bench_swiglu.py --smoke    # tiny CPU shapes through the interpreter
"""

from __future__ import annotations

import sys

import harness  # first: with --smoke it selects Triton's interpreter before triton loads
import torch

from fasttune.ops.swiglu import swiglu, swiglu_ref

SMOKE = "--smoke" in sys.argv
DEVICE = harness.device(SMOKE)
I = 64 if SMOKE else 4864
TOKENS = [8] if SMOKE else [4096, 16384, 32768]
DTYPE = torch.bfloat16


def cases() -> list[harness.Case]:
    def make(tokens):
        def inputs():
            return [torch.randn(tokens, I, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(2)]

        return inputs

    return [harness.Case(f"{t}x{I} {str(DTYPE).removeprefix('torch.')}", make(t)) for t in TOKENS]


def liger_variant():
    # Liger's SiLU-mul takes (a, b) = (gate, up) and returns silu(a) * b, the same call as ours.
    fn = harness.liger("liger_kernel.ops.swiglu:LigerSiLUMulFunction")
    return None if fn is None else fn.apply


def main():
    harness.run(
        "swiglu",
        cases(),
        {
            "fasttune": swiglu,
            "eager": swiglu_ref,
            "compiled": torch.compile(swiglu_ref),
            "liger": liger_variant(),
        },
    )


if __name__ == "__main__":
    main()
