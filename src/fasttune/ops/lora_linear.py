"""A LoRA linear layer with the adapter's up-projection fused into the base GEMM.

    y = x W^T + b + s * dropout(x) A^T B^T,     W [out, in] frozen, A [r, in] and B [out, r] fp32

The obvious implementations either merge the weight (W + s B A: an [out, in] tensor per call, and a
gradient path through it) or run the adapter as two extra GEMMs whose [N, out] fp32 result is cast and
added to the base output (the PEFT way: three passes over an [N, out] tensor that the base GEMM just
wrote). Here the low-rank down-projection xa = dropout(x) A^T ([N, r], tiny) is a torch matmul in fp32,
and one Triton kernel computes x W^T over K = in and then (s * xa) B^T over K = r into the same fp32
accumulator, adds the bias, and rounds once to x's dtype. dx in the backward has the same shape of
problem (dy W plus a rank-r correction masked by the dropout), so it runs through the same kernel.

Dropout is a bool keep-mask of x's shape drawn with torch's RNG (`lora_dropout_mask`), so a test can
reproduce the op's draw from the same generator seed, and the reference and the op share one draw. The
mask is saved for the backward (1 byte per input element), rather than a seed: regenerating a mask
inside the kernels would tie the draw to Triton's RNG, which no PyTorch reference can replay.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fasttune.ops import check_triton, interpreting


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`models.lora.LoraLinear.forward` with the dropout draw as an argument: `dropout_mask` is a bool
    keep-mask of x's shape (None: no dropout) and `dropout_p` the probability it was drawn with, so that
    dropped(x) = x * mask / (1 - p), computed as `nn.Dropout` computes it (the kept scale 1 / (1 - p) is
    rounded to fp32 first)."""
    base = F.linear(x, weight, bias)
    xf = x.float()
    if dropout_mask is not None:
        xf = xf * dropout_mask.float().div_(1 - dropout_p)
    update = F.linear(F.linear(xf, lora_A), lora_B) * scaling
    return base + update.to(base.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _lowrank_gemm_kernel(
    x_ptr,
    w_ptr,
    l_ptr,
    r_ptr,
    keep_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    stride_km,
    stride_kn,
    stride_ym,
    stride_yn,
    scaling,
    keep_scale,
    HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y[M, N] = X[M, K] @ W[K, N] + keep * s * (L[M, R] @ R[R, N]) + bias[N], with keep = mask[M, N] *
    keep_scale when HAS_KEEP (else 1). X and W are in the base dtype; L and R are fp32. One program owns a
    BLOCK_M x BLOCK_N tile of Y and keeps its sum in one fp32 accumulator across both K loops."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive row tiles sweep the column tiles together, so the W tiles they
    # share are still in L2 when the next row tile asks for them.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap around to valid ones: their loads need no mask (only K does),
    # and what they compute is never stored. int64 because N * in passes 2^31 at long contexts.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # The base GEMM: X W over K = in_features (forward) or out_features (dx).
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_in = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=BASE_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The low-rank term over K = r, in fp32 with exact ("ieee") products: L and R are fp32 (the adapter
    # trains in fp32), and tf32 would round them to 10 mantissa bits. The price: "ieee" runs on the FMA
    # units, not the tensor cores, so on an H100/H200 this loop costs about (r / K) x 15 of the base loop,
    # ~25% at K = 896 and ~5% at K = 4864 by that estimate (unmeasured; "tf32x3" or "tf32" are the
    # tensor-core alternatives to benchmark against it).
    offs_r = tl.arange(0, BLOCK_R)
    l_ptrs = l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr
    r_ptrs = r_ptr + offs_r[:, None] * stride_rr + cols[None, :] * stride_rn
    if HAS_KEEP:
        # The dropout mask multiplies the low-rank term only, element by element, so that term needs its
        # own accumulator until the mask is applied.
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        low = acc
    for j in range(0, tl.cdiv(R, BLOCK_R)):
        r_in = offs_r < R - j * BLOCK_R
        la = tl.load(l_ptrs, mask=r_in[None, :], other=0.0) * scaling
        rb = tl.load(r_ptrs, mask=r_in[:, None], other=0.0)
        low = tl.dot(la, rb, low, input_precision="ieee")
        l_ptrs += BLOCK_R * stride_lr
        r_ptrs += BLOCK_R * stride_rr
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rows[:, None] * stride_km + cols[None, :] * stride_kn)
        acc += tl.where(keep != 0, low * keep_scale, 0.0)
    else:
        acc = low

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launcher


def _tiles(M: int, N: int, K: int, R: int, dtype: torch.dtype) -> dict:
    if interpreting():
        # The interpreter pays per program and per loop step, not per lane: few, large tiles (but no larger
        # than the problem, whose padding it would compute).
        return dict(
            BLOCK_M=min(64, max(16, triton.next_power_of_2(M))),
            BLOCK_N=min(128, max(16, triton.next_power_of_2(N))),
            BLOCK_K=min(128, max(16, triton.next_power_of_2(K))),
            BLOCK_R=min(64, max(16, triton.next_power_of_2(R))),
            GROUP_M=8,
        )
    # 128 x 128 output tiles with 8 warps, a common starting point for bf16 GEMMs on Ampere/Hopper (not
    # yet tuned on a GPU). fp32 operands take twice the shared memory per element, hence the shorter K
    # step. tl.dot needs every dim >= 16.
    return dict(
        BLOCK_M=128,
        BLOCK_N=128,
        BLOCK_K=64 if dtype != torch.float32 else 32,
        BLOCK_R=min(64, max(16, triton.next_power_of_2(R))),
        GROUP_M=8,
        num_warps=8,
        num_stages=3,
    )


def _lowrank_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    low: torch.Tensor,
    up: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_scale: float = 1.0,
) -> torch.Tensor:
    """x [M, K] @ w [K, N] + keep * scaling * (low [M, R] @ up [R, N]) + bias, in x's dtype. Any strides
    (w and up are usually transposed views of the stored weights)."""
    M, K = x.shape
    N, R = w.shape[1], low.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    # fp32 operands follow PyTorch's own fp32 matmul setting, so the op is as precise as the F.linear it
    # replaces (exact by default; tf32 where the user allowed it).
    exact = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    tiles = _tiles(M, N, K, R, x.dtype)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    # Unused pointers get a valid tensor (y) so that the kernel's signature does not depend on them.
    keep_arg = keep.view(torch.uint8) if keep is not None else y
    _lowrank_gemm_kernel[grid](
        x,
        w,
        low,
        up,
        keep_arg,
        bias if bias is not None else y,
        y,
        M,
        N,
        K,
        R,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        low.stride(0),
        low.stride(1),
        up.stride(0),
        up.stride(1),
        keep_arg.stride(0),
        keep_arg.stride(1),
        y.stride(0),
        y.stride(1),
        float(scaling),
        float(keep_scale),
        HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None,
        BASE_PRECISION="ieee" if exact else "tf32",
        **tiles,
    )
    return y


def _keep_scale(p: float) -> float:
    """1 / (1 - p) rounded as `nn.Dropout` rounds it (an fp32 division), so the op drops out bit for bit
    as `LoraLinear` does for the same mask."""
    return float(np.float32(1.0) / np.float32(1.0 - p))


def _dropped(x2: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """dropout(x) in fp32 for the given keep-mask: a transient [N, in] fp32 tensor."""
    if mask is None:
        return x2.float()
    # x * mask is exact in x's dtype (a multiplication by 0 or 1); the one rounding is the fp32 scale.
    return (x2 * mask).float().mul_(_keep_scale(p))


# ----------------------------------------------------------------------------------------------------------
# Autograd


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * xa B^T, xa = xd A^T, xd = x * m / (1 - p) (m the keep-mask; xd = x without
    dropout). W and b are frozen.

    Forward: xa [N, r] is a torch fp32 matmul; one Triton kernel computes x W^T (base dtype operands,
    fp32 accumulator), adds (s xa) B^T (fp32, exact products) into the same accumulator, adds b and rounds
    once to x's dtype. W + s B A is never formed and the adapter has no [N, out] intermediate.

    Backward, with g = dy B ([N, r], fp32):
        dx = dy W + m / (1 - p) * s (g A)     the same fused kernel: K = out, then K = r, masked
        dA = s g^T xd                         torch fp32 matmul ([r, in])
        dB = s dy^T xa                        torch fp32 matmul ([out, r])
    and nothing for W and b. Saved: x (in its own dtype), the bool mask, and xa, which is r / in of x's
    size and would cost a pass over x to recompute; xd is recomputed from x and the mask, since an fp32
    copy would be twice a bf16 x's size. dA and dB reduce over all N tokens into r x in and out x r
    outputs, too small to fill a GPU without splitting the N reduction, which cuBLAS's split-K kernels
    already do: they stay torch matmuls. dx is a full GEMM whose LoRA term would otherwise be an [N, in]
    fp32 tensor plus three elementwise passes and a second rounding, so it is fused.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, scaling, mask2, dropout_p):
        # x2 [N, in] and the output [N, out] are 2-D: the public function flattens and unflattens outside
        # the Function, so the tensor callers see is a view of this Function's own output (a view of an
        # internal buffer would have no autograd history for in-place ops such as rope to route through).
        y, xa = lora_forward(x2, weight, bias, lora_A, lora_B, scaling, mask2, dropout_p)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, mask2)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, xa, mask2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dA, dB = lora_backward(
            dy,
            x2,
            lambda: weight,
            lora_A,
            lora_B,
            xa,
            mask2,
            ctx.scaling,
            ctx.dropout_p,
            needs[0],
            needs[3],
            needs[4],
        )
        return dx, None, None, dA, dB, None, None, None


def lora_forward(x2, weight, bias, lora_A, lora_B, s, mask2, p):
    """(y, xa) of the docstring above, with autocast off (the dtypes are set: the kernel takes fp32
    low-rank operands). Shared with QLoRA (qlora.py), whose W is an NF4 layer's dequantisation."""
    with torch.autocast(x2.device.type, enabled=False):
        xa = _dropped(x2, mask2, p) @ lora_A.t()
        return _lowrank_gemm(x2, weight.t(), xa, lora_B.t(), s, bias=bias), xa


def lora_backward(dy, x2, weight_fn, lora_A, lora_B, xa, mask2, s, p, need_x, need_A, need_B):
    """(dx, dA, dB) of the docstring above, with autocast off (a backward may run under it). `weight_fn()`
    gives W, asked for only when dx is needed (QLoRA dequantises it then)."""
    dx = dA = dB = None
    with torch.autocast(dy.device.type, enabled=False):
        dy_f = dy.float()
        if need_x or need_A:
            g = dy_f @ lora_B
            if need_x:
                keep_scale = _keep_scale(p) if mask2 is not None else 1.0
                dx = _lowrank_gemm(dy, weight_fn(), g, lora_A, s, keep=mask2, keep_scale=keep_scale)
            if need_A:
                dA = (g.t() @ _dropped(x2, mask2, p)).mul_(s)
        if need_B:
            dB = (dy_f.t() @ xa).mul_(s)
    return dx, dA, dB


# ----------------------------------------------------------------------------------------------------------
# Public function


def lora_dropout_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The keep-mask `lora_linear` draws in training: bool, True with probability 1 - p. On the CPU it is
    the same draw as `nn.Dropout`'s for the same generator state."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`LoraLinear`'s forward, fused: y = x W^T + b + scaling * dropout(x) A^T B^T in x's dtype.

    x [..., in] in the base dtype (bf16, fp16 or fp32, that of weight [out, in] and bias [out]); lora_A
    [r, in] and lora_B [out, r] in fp32. Dropout (probability `dropout_p`, acting on the adapter's input
    only) is drawn with `generator` when `training`. The base weight and bias must be frozen: they get no
    gradient, so one that requires grad is refused rather than silently left untrained.
    """
    if torch.is_autocast_enabled(x.device.type):
        # As nn.Linear under autocast: the base GEMM's operands in the autocast dtype. The adapters stay
        # fp32 (the op's contract); the Function's math runs with autocast off, so nothing is re-cast.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    check_triton(*tensors, op="lora_linear")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_features or lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(
            f"lora_linear: shapes do not chain: x {tuple(x.shape)}, weight "
            f"{tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"lora_linear: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
            + (f", {bias.dtype}" if bias is not None else "")
        )
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        raise ValueError(f"lora_linear: lora_A and lora_B must be fp32, got {lora_A.dtype}, {lora_B.dtype}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "lora_linear: the base weight and bias must be frozen (requires_grad=False); "
            "this op computes no gradient for them"
        )
    mask = lora_dropout_mask(x.shape, dropout_p, x.device, generator) if training and dropout_p > 0 else None
    x2 = x.reshape(-1, in_features)
    mask2 = mask.reshape(-1, in_features) if mask is not None else None
    y = LoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), mask2, float(dropout_p))
    return y.view(*x.shape[:-1], out_features)
