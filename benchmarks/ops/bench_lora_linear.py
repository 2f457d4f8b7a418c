"""Benchmark the fused LoRA linear (y = x W^T + b + s x A^T B^T, the up-projection fused into the base
GEMM) against PyTorch eager (`lora_linear_ref`, LoraLinear's math), torch.compile of it, and PEFT's
unfused form, on Qwen2.5-0.5B's q_proj (896 -> 896, with bias), gate_proj (896 -> 4864) and down_proj
(4864 -> 896): bf16 base weight, fp32 adapters of rank 16, no dropout.

    python benchmarks/ops/bench_lora_linear.py            # on a GPU: timings and peak memory as JSON
    python benchmarks/ops/bench_lora_linear.py --smoke    # tiny CPU shapes through the interpreter
"""

from __future__ import annotations

import sys

import harness  # first: with --smoke it selects Triton's interpreter before triton loads
import torch
import torch.nn.functional as F

from fasttune.ops.lora_linear import lora_linear, lora_linear_ref

SMOKE = "--smoke" in sys.argv
DEVICE = harness.device(SMOKE)
# The interpreter computes bf16 tl.dot wrongly (see tests/conftest.py): the smoke run, which only checks
# that the script works, uses fp32 so that what it runs is at least sane.
DTYPE = torch.float32 if SMOKE else torch.bfloat16
R, ALPHA = 16, 32.0
SCALING = ALPHA / R
HIDDEN, INTERMEDIATE = (48, 80) if SMOKE else (896, 4864)
TOKENS = [8] if SMOKE else [4096, 16384, 32768]
# name: (in, out, bias). Qwen2's q/k/v projections have a bias; the MLP's do not.
LAYERS = {
    "q_proj": (HIDDEN, HIDDEN, True),
    "gate_proj": (HIDDEN, INTERMEDIATE, False),
    "down_proj": (INTERMEDIATE, HIDDEN, False),
}


def cases() -> list[harness.Case]:
    def make(tokens, d_in, d_out, bias):
        def inputs():
            x = torch.randn(tokens, d_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
            weight = torch.randn(d_out, d_in, device=DEVICE, dtype=DTYPE) * d_in**-0.5
            A = (torch.randn(R, d_in, device=DEVICE) * d_in**-0.5).requires_grad_()
            B = (torch.randn(d_out, R, device=DEVICE) * R**-0.5).requires_grad_()
            # The bias, when there is one, goes last: a case's inputs are a flat list of tensors.
            return [x, weight, A, B] + ([torch.randn(d_out, device=DEVICE, dtype=DTYPE)] if bias else [])

        return inputs

    dtype = str(DTYPE).removeprefix("torch.")
    return [
        harness.Case(f"{name} {t}x{d_in}->{d_out} r{R} {dtype}", make(t, d_in, d_out, bias))
        for name, (d_in, d_out, bias) in LAYERS.items()
        for t in TOKENS
    ]


def _args(x, weight, A, B, *bias):
    return x, weight, (bias[0] if bias else None), A, B


def fasttune(*inputs):
    return lora_linear(*_args(*inputs), SCALING)


def eager(*inputs):
    return lora_linear_ref(*_args(*inputs), SCALING)


_compiled_ref = torch.compile(lora_linear_ref)


def compiled(*inputs):
    return _compiled_ref(*_args(*inputs), SCALING)


def unfused(*inputs):
    """PEFT's LoRA forward: base output, plus the adapter run as two more linears on x cast to the
    adapter's dtype (fp32 here), the sum cast back to the base dtype."""
    x, weight, bias, A, B = _args(*inputs)
    return (F.linear(x, weight, bias) + F.linear(F.linear(x.to(A.dtype), A), B) * SCALING).to(x.dtype)


def main():
    harness.run(
        "lora_linear",
        cases(),
        {"fasttune": fasttune, "eager": eager, "compiled": compiled, "unfused": unfused},
    )


if __name__ == "__main__":
    main()
