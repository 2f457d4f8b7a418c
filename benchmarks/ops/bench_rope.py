"""Benchmark RoPE on q and k: fasttune's in-place Triton kernel (angles computed in the kernel) against
PyTorch eager (`rope_ref`: cos/sin tables, then the model's `apply_rope`), torch.compile of it, and
Liger-Kernel's kernel (which reads precomputed cos/sin tables), at Qwen2.5-0.5B's heads (14 q, 2 kv,
head_dim 64, rope_theta 1e6) in bf16.

The reference workload: one packed row [1, T] of documents of about 58 tokens, positions restarting at 0
for each, at T = 4096, 16384 and 32768.

    python benchmarks/ops/bench_rope.py            # on a GPU: timings and peak memory as JSON
    python benchmarks/ops/bench_rope.py --smoke    # tiny CPU shapes through the interpreter

In-place variants and the clones they get: fasttune's op and Liger's rotate q and k in place, and the
harness hands every variant the same leaf tensors (requires_grad), which autograd does not let a Function
modify in place (Liger would silently overwrite them). So both get fresh clones of q and k inside the
timed call, and their forward and forward+backward times include two copies as large as the op's own
memory traffic. The "clone" row times exactly those copies, to subtract by eye; the backward times
(clone's backward passes the gradient through) and the memory figures are comparable as they are.
"""

from __future__ import annotations

import sys

import harness  # first: with --smoke it selects Triton's interpreter before triton loads
import torch

from fasttune.models.model import rope_cos_sin
from fasttune.ops.rope import rope, rope_ref

SMOKE = "--smoke" in sys.argv
DEVICE = harness.device(SMOKE)
DTYPE = torch.bfloat16
N_Q, N_KV, HD = (6, 2, 16) if SMOKE else (14, 2, 64)
THETA = 1e6  # Qwen2.5's rope_theta
TOKENS = [64] if SMOKE else [4096, 16384, 32768]
DOC_LEN = 58  # mean packed document length of the reference workload


def packed_positions(tokens: int) -> torch.Tensor:
    """[1, tokens]: documents of DOC_LEN/2 to 3 DOC_LEN/2 tokens (a fixed seed), positions restarting."""
    g = torch.Generator().manual_seed(0)
    parts, n = [], 0
    while n < tokens:
        length = min(int(torch.randint(DOC_LEN // 2, 3 * DOC_LEN // 2 + 1, (), generator=g)), tokens - n)
        parts.append(torch.arange(length))
        n += length
    return torch.cat(parts)[None]


def cases() -> list[harness.Case]:
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))

    def make(tokens):
        def inputs():
            q = torch.randn(1, tokens, N_Q, HD, device=DEVICE, dtype=DTYPE, requires_grad=True)
            k = torch.randn(1, tokens, N_KV, HD, device=DEVICE, dtype=DTYPE, requires_grad=True)
            return [q, k, packed_positions(tokens).to(DEVICE), inv_freq.to(DEVICE)]

        return inputs

    dtype = str(DTYPE).removeprefix("torch.")
    return [harness.Case(f"1x{t} q{N_Q} kv{N_KV} hd{HD} {dtype}", make(t)) for t in TOKENS]


def fasttune(q, k, position_ids, inv_freq):
    # In place: rotates fresh clones (see the module docstring), never the harness's leaves.
    return rope(q.clone(), k.clone(), position_ids, inv_freq)


def clone(q, k, position_ids, inv_freq):
    """Only the two copies the in-place variants make: their share of the time."""
    return q.clone(), k.clone()


def eager(q, k, position_ids, inv_freq):
    return rope_ref(q, k, position_ids, inv_freq)


def liger_variant():
    """Liger's RoPE adapted to (q, k, position_ids, inv_freq) -> (q, k). It takes [B, n, T, hd] (HF's
    layout after the transpose) and [1, T, hd] cos/sin tables; the tables are built once per input set
    (the model would build them once per step for all layers), outside the timed calls after the first."""
    fn = harness.liger("liger_kernel.ops.rope:LigerRopeFunction")
    if fn is None:
        return None
    tables = {}

    def run(q, k, position_ids, inv_freq):
        key = (position_ids.data_ptr(), q.dtype)
        if key not in tables:
            tables.clear()
            tables[key] = rope_cos_sin(inv_freq, position_ids, q.dtype)
        cos, sin = tables[key]
        # Fresh clones, as for fasttune: Liger writes over its inputs' memory.
        out = fn.apply(q.clone().transpose(1, 2), k.clone().transpose(1, 2), cos, sin)
        return out[0].transpose(1, 2), out[1].transpose(1, 2)

    return run


def main():
    harness.run(
        "rope",
        cases(),
        {
            "fasttune": fasttune,
            "clone": clone,
            "eager": eager,
            "compiled": torch.compile(eager),
            "liger": liger_variant(),
        },
    )


if __name__ == "__main__":
    main()
