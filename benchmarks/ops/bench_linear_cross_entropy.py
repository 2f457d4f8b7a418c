"""Benchmark the LM head + cross-entropy (summed over targets): fasttune's chunked op against PyTorch eager,
torch.compile and Liger-Kernel, at Qwen2.5-0.5B's H = 896 and V = 151,936 in bf16.

    python benchmarks/ops/bench_linear_cross_entropy.py            # on a GPU: timings and peak memory
    python benchmarks/ops/bench_linear_cross_entropy.py --smoke    # tiny CPU shapes through the interpreter

Memory: eager materialises bf16 logits and their fp32 copy, [N, V] x 6 B, and their gradients in the
backward: 32k tokens take ~10 GB of bf16 and ~19 GB of fp32 logits before the backward starts. A variant
that runs out of memory is recorded by the harness as an error for that shape; the others still run.
"""

from __future__ import annotations

import sys

import harness  # first: with --smoke it selects Triton's interpreter before triton loads
import torch

from fasttune.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

SMOKE = "--smoke" in sys.argv
DEVICE = harness.device(SMOKE)
H, V = (32, 1000) if SMOKE else (896, 151_936)
TOKENS = [24] if SMOKE else [4096, 16384, 32768]
DTYPE = torch.bfloat16
IGNORED = 0.1  # a share of -100 targets, as prompts and sequence ends give in packed fine-tuning rows


def cases() -> list[harness.Case]:
    def make(tokens):
        def inputs():
            hidden = torch.randn(tokens, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
            # Logits of standard deviation ~3 (a trained head's spread), a leaf like the model's Parameter.
            weight = (3 * H**-0.5 * torch.randn(V, H, device=DEVICE)).to(DTYPE).requires_grad_()
            targets = torch.randint(0, V, (tokens,), device=DEVICE)
            targets[torch.rand(tokens, device=DEVICE) < IGNORED] = -100
            return [hidden, weight, targets]

        return inputs

    return [harness.Case(f"{t}x{H}x{V} {str(DTYPE).removeprefix('torch.')}", make(t)) for t in TOKENS]


def fasttune(hidden, weight, targets):
    return linear_cross_entropy(hidden, weight, targets)[0]


def eager(hidden, weight, targets):
    return linear_cross_entropy_ref(hidden, weight, targets)[0]


def liger_variant():
    # Liger's positional arguments: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction); newer versions return a tuple whose first item is the loss.
    fn = harness.liger("liger_kernel.ops.fused_linear_cross_entropy:LigerFusedLinearCrossEntropyFunction")
    if fn is None:
        return None

    def liger(hidden, weight, targets):
        out = fn.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "sum")
        return out[0] if isinstance(out, tuple) else out

    return liger


def main():
    harness.run(
        "linear_cross_entropy",
        cases(),
        {
            "fasttune": fasttune,
            "eager": eager,
            "compiled": torch.compile(eager),
            "liger": liger_variant(),
        },
    )


if __name__ == "__main__":
    main()
