"""The shared fp32 -> output-dtype rounding of the ops' kernels (`fasttune/ops/_rounding.py`)."""

import torch
import triton
import triton.language as tl

from fasttune.ops._rounding import round_to

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _round_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, round_to(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)


def test_round_to_bf16_bit_patterns():
    # The kernel's fp32 -> bf16 rounding on chosen bit patterns. The interpreter's x86 arithmetic keeps
    # NaN payloads, so NVIDIA's canonical NaN 0x7FFFFFFF (where a bare "+0x7FFF" trick carries into the
    # sign and gives -0.0) can only be fed in directly.
    cases = {  # fp32 bits -> bf16 bits
        0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, even kept bit: down
        0x3F818000: 0x3F82,  # a tie, odd kept bit: up
        0x3F808001: 0x3F81,  # just above the tie: up
        0xBF807FFF: 0xBF80,  # just below the tie, negative: toward zero
        0x7F7FFFFF: 0x7F80,  # fp32 max: rounds to inf
        0xFF800000: 0xFF80,  # -inf
        0x00000001: 0x0000,  # the smallest subnormal: to +0
    }
    x = torch.tensor(list(cases) + [0x7FFFFFFF, 0xFFC00000, 0x7F800001], dtype=torch.int64)
    x = x.to(torch.int32).view(torch.float32).to(DEVICE)
    y = torch.empty(len(x), dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, len(x), BLOCK=16)
    got = y.cpu().view(torch.int16).to(torch.int64) & 0xFFFF
    assert got[: len(cases)].tolist() == list(cases.values())
    assert y[len(cases) :].isnan().all(), got[len(cases) :].tolist()


def test_round_to_matches_pytorch_on_random_values():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-40, 38, 100_000)
    x = x.to(DEVICE)
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.empty(len(x), dtype=dtype, device=DEVICE)
        for s in range(0, len(x), 4096):  # the kernel handles BLOCK elements per launch
            n = min(4096, len(x) - s)
            _round_block[(1,)](x[s:], y[s:], n, BLOCK=4096)
        assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16)), dtype


@triton.jit
def _round_block(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, round_to(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)
