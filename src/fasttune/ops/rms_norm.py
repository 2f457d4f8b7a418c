"""RMSNorm over the last dimension, optionally fused with the residual add that precedes it.

The numerics are the model's (`models.model.RMSNorm`, as transformers): the normalisation in fp32, its
result rounded to the activation dtype, and only then the multiply by the weight, so the output dtype is
`promote_types(weight.dtype, x.dtype)` (fp32 under mixed precision, where the weight stays fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fasttune.ops import check_triton
from fasttune.ops._rounding import round_to

# One row lives in registers: 64K fp32 values per program is already 256 KiB spread over the warps, the
# most that still compiles to something sensible. Qwen/Llama widths are 896 to 8192.
MAX_HIDDEN = 65536


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype), h = x (+ residual, in x's dtype).

    Returns y, or (y, h) when `residual` is given. The statistics are computed in fp32, or in fp64 for fp64
    inputs (how the tests build the exact reference); that is `h.float()` for every training dtype.
    """
    h = x if residual is None else (x + residual).to(x.dtype)
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, h)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H_OUT, RSTD, n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr
):
    # One row per program. int64 offsets: rows x H passes 2^31 at 262K tokens x 8192.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    h = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x + residual is one fp32 add rounded to x's dtype, which is what PyTorch's add does.
        r = tl.load(R + offs, mask=mask, other=0.0)
        h = round_to(h.to(tl.float32) + r.to(tl.float32), X.dtype.element_ty)
        tl.store(H_OUT + offs, h, mask=mask)
    hf = h.to(tl.float32)
    # Masked lanes load 0, so they add nothing to the sum of squares.
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    # Round xhat to the activation dtype before the weight multiply, as the reference does; the product of
    # two <=16-bit floats is exact in fp32, so a single rounding to Y's dtype follows, again as in PyTorch.
    xhat = round_to(hf * rstd, X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, round_to(w * xhat, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    DH_OUT,
    H,
    W,
    RSTD,
    DH,
    DW_PARTIAL,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DH_OUT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each program walks a contiguous block of rows and keeps its share of dw in fp32 registers, written
    # once as one row of DW_PARTIAL [programs, H]: no atomics, so dw is deterministic run to run.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    # int64 bounds make the loop counter int64 on the GPU (row * H passes 2^31 at 262K tokens x 8192).
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        offs = row * n_cols + cols
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        hf = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        # The same fp32 product as the forward; the cast to the activation dtype is the identity for the
        # gradient, so dx goes through the unrounded xhat and dw sees the rounded one the forward used.
        xhat = hf * rstd
        dxhat = dy * w
        # d xhat_i / d h_j = rstd (delta_ij - xhat_i xhat_j / H), so
        # dh = rstd (dxhat - xhat mean(dxhat xhat))
        c = tl.sum(dxhat * xhat, axis=0) / n_cols
        dh = rstd * (dxhat - xhat * c)
        if HAS_DH_OUT:
            # The returned h feeds the rest of the residual stream; its gradient joins here, added in fp32
            # and rounded once.
            dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + offs, round_to(dh, DH.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * round_to(xhat, H.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    # 8-16 fp32 values of the row per thread up to H = 8192 (1024/128, 4096/256, 8192/512): fewer threads
    # would spill registers at the larger widths, more would leave most lanes without work at H = 896.
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@functools.lru_cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(device: torch.device, n_rows: int) -> int:
    # On a GPU, 4 programs per SM: a single 4-warp program per SM would stall on every row's loads; more
    # only grows the [programs, H] partial sums (4 x 132 x 896 x 4 B = 1.9 MB on an H100, against 59 MB
    # of dy and h at 16K tokens). The interpreter runs programs one after another, so the count there
    # changes nothing but the number of partial rows.
    n = (
        4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 4
    )
    return max(1, min(n, n_rows))


def _rms_norm_fwd(x, weight, residual, eps):
    """x, residual: contiguous [..., H]; returns y, h (x itself without residual) and rstd [rows] fp32."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    h = x if residual is None else torch.empty_like(x)
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x,
            x if residual is None else residual,
            weight,
            y,
            h,
            rstd,
            n_cols,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return y, h, rstd


def _rms_norm_bwd(dy, dh_out, h, weight, rstd, compute_dw):
    """Returns dh (h's dtype) and dw (weight's dtype, or None)."""
    n_cols = h.shape[-1]
    n_rows = h.numel() // n_cols
    dh = torch.empty_like(h)
    programs = _bwd_programs(h.device, n_rows)
    partial = torch.empty((programs, n_cols) if compute_dw else (0,), dtype=torch.float32, device=h.device)
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_bwd_kernel[(programs,)](
            dy,
            dy if dh_out is None else dh_out,
            h,
            weight,
            rstd,
            dh,
            partial,
            n_rows,
            n_cols,
            triton.cdiv(n_rows, programs),
            HAS_DH_OUT=dh_out is not None,
            COMPUTE_DW=compute_dw,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    elif compute_dw:
        partial.zero_()
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dh, dw


class RMSNormFunction(torch.autograd.Function):
    """h = x (+ r, rounded to x's dtype); rstd = (mean_j h_j^2 + eps)^(-1/2) in fp32;
    xhat = h * rstd; y = w * cast(xhat) with cast to x's dtype, y in promote(w, x).

    Backward (the cast passes gradients unchanged), with dxhat = dy * w, per row of H values:
        dh = rstd * (dxhat - xhat * mean_j(dxhat_j * xhat_j)) + dh_out     (dh_out: gradient of returned h)
        dx = dr = dh,    dw = sum over rows of dy * cast(xhat).
    Saved: h (x itself, or the h output), w, and rstd (one fp32 per row); xhat is recomputed.
    """

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        x = x.contiguous()
        residual = None if residual is None else residual.contiguous()
        weight = weight.contiguous()
        y, h, rstd = _rms_norm_fwd(x, weight, residual, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.residual_dtype = None if residual is None else residual.dtype
        # A None gradient (an output nobody used) costs nothing; materialised it would be a tensor of zeros
        # read back from memory.
        ctx.set_materialize_grads(False)
        ctx.y_meta = (y.shape, y.dtype)
        return y if residual is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(ctx.y_meta[0], dtype=ctx.y_meta[1], device=h.device)
        dh_out = None if dh_out is None else dh_out.contiguous()
        dh, dw = _rms_norm_bwd(dy.contiguous(), dh_out, h, weight, rstd, ctx.needs_input_grad[1])
        dres = None
        if ctx.residual_dtype is not None and ctx.needs_input_grad[2]:
            # The same tensor for x and residual, as PyTorch's own add backward does.
            dres = dh if ctx.residual_dtype == dh.dtype else dh.to(ctx.residual_dtype)
        return dh if ctx.needs_input_grad[0] else None, dw, dres, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x [..., H] with weight [H]: y, or (y, h) where h = x + residual is the new residual
    stream. y has dtype promote_types(weight.dtype, x.dtype), h has x's dtype. See `rms_norm_ref`."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    check_triton(*tensors, op="rms_norm")
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x [..., {n_cols}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if n_cols > MAX_HIDDEN:
        raise ValueError(
            f"rms_norm: hidden size {n_cols} > {MAX_HIDDEN}, more than a program holds in registers"
        )
    return RMSNormFunction.apply(x, weight, residual, eps)
