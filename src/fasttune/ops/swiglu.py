"""SwiGLU's gating, silu(gate) * up, the middle of the MLP: down(silu(gate(x)) * up(x)).

Elementwise over the flattened tensors, in fp32 with one rounding to the input dtype per output. Only gate
and up are kept for the backward; silu(gate) and the product are recomputed there, which saves one
[tokens, I] activation per layer against PyTorch eager (which keeps silu(gate) as well).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fasttune.ops import check_triton, interpreting
from fasttune.ops._rounding import round_to


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, in the inputs' dtype (as the model's MLP)."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    # int64 offsets: tokens x I passes 2^31 at 442K tokens of Qwen2.5-0.5B (I = 4864).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    # g / (1 + e^-g) is one rounding fewer than g * sigmoid(g), and is how PyTorch computes silu.
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + offs, round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    # silu'(g) = s + g s (1 - s) = s (1 + g (1 - s))
    tl.store(DG + offs, round_to(dy * u * s * (1.0 + g * (1.0 - s)), DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, round_to(dy * g * s, DU.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    # 1024 elements per program (8 per thread at 4 warps: two 16-byte bf16 loads per tensor) on a GPU. The
    # interpreter pays per program, not per element, and these kernels are elementwise, so a larger block
    # there changes no result and runs a 64 x 4864 test in 19 programs instead of 304.
    return 16384 if interpreting() and t.device.type == "cpu" else 1024


def _swiglu_fwd(gate, up):
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=4)
    return y


def _swiglu_bwd(dy, gate, up):
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block(gate)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dgate, dup, n, BLOCK=block, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(g) * u = g * s * u with s = sigmoid(g), computed in fp32.

    Backward: dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s.  Saved: g and u only.

    The gradients go to new tensors, not into the saved g and u buffers. Writing them in place would save
    two [tokens, I] allocations at the backward's peak, but it is only safe when nothing else can read g
    or u afterwards, which this function cannot see: a second backward with retain_graph=True (the
    benchmark harness does exactly that) would recompute from gradients, and g or u passed in as leaves
    or kept by the caller would be silently overwritten.
    """

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = _swiglu_bwd(dy.contiguous(), gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up of the same shape and dtype; the result has that dtype."""
    check_triton(gate, up, op="swiglu")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ"
        )
    return SwiGLUFunction.apply(gate, up)
