"""Rotary position embeddings for q and k, in place, with the angles computed in the kernel.

The numerics are the model's (`fasttune.models.model.rope_cos_sin` + `apply_rope`, as transformers): the angle
of position p and frequency f is the fp32 product `float(p) * f`, and the "half-split" layout rotates the
pair (x[i], x[i + hd/2]) by it. The reference then rounds cos and sin to the activation dtype and does
the multiply-adds in that dtype; the kernel keeps cos, sin and the rotation in fp32 and rounds once, on
the store, so in fp16/bf16 it is closer to the exact result than the reference is.

Memory: no [B, T, hd] cos/sin tables are built or read (the model's PyTorch path materialises two per
forward); each token's angles are computed once and used for all of its q and k heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fasttune.ops import check_triton
from fasttune.ops._rounding import round_to

# q and k tiles of about this many rotation pairs per program: big enough to amortise the angles and the
# index math, small enough to stay in registers (two fp32 halves per pair).
TILE_PAIRS = 2048


def rope_ref(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor):
    """The model's RoPE, out of place: q [B, T, n_q, hd], k [B, T, n_kv, hd], position_ids [B, T] (or
    [1, T]), inv_freq [hd/2] fp32. Returns (q_out, k_out) in the inputs' dtype.

    On fp64 inputs (how the tests build the exact result) the angles and their cos/sin are still fp32,
    exactly as in training, and only the multiply-adds are fp64.
    """
    # The model's math (models/model.py: rope_cos_sin, apply_rope), written out here because ops sit below
    # the model; tests/ops/test_rope.py checks the two agree bit for bit.
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, :, None], emb.sin().to(q.dtype)[:, :, None]

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), rotate(k)


# fmt: off
# (The kernels' argument lists are grouped one tensor per line; ruff format would give each its own.)
@triton.jit
def _rotate_heads(src_row, s_h, s_d, dst_row, d_h, d_d, tok_ok, cos, sin,
                  N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    # A [tokens, heads, hd/2] tile from the tokens' row pointers: x1 = x[..., :hd/2], x2 = x[..., hd/2:].
    # int64 indices: with an arbitrary layout (e.g. [B, n, T, hd] transposed) h * s_h alone can pass 2^31.
    h = tl.arange(0, BLOCK_H).to(tl.int64)[None, :, None]
    d = tl.arange(0, BLOCK_D).to(tl.int64)[None, None, :]
    mask = tok_ok[:, None, None] & (h < N_HEADS) & (d < HALF)
    src = src_row[:, None, None] + h * s_h
    dst = dst_row[:, None, None] + h * d_h
    x1 = tl.load(src + d * s_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + (d + HALF) * s_d, mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    # Both halves are loaded before either is stored, so src == dst (in place) is safe: no other program
    # touches this token's elements.
    out_ty = dst_row.dtype.element_ty
    tl.store(dst + d * d_d, round_to(x1 * c - x2 * s, out_ty), mask=mask)
    tl.store(dst + (d + HALF) * d_d, round_to(x2 * c + x1 * s, out_ty), mask=mask)


@triton.jit
def _rope_kernel(Q_SRC, qs_b, qs_t, qs_h, qs_d,
                 Q_DST, qd_b, qd_t, qd_h, qd_d,
                 K_SRC, ks_b, ks_t, ks_h, ks_d,
                 K_DST, kd_b, kd_t, kd_h, kd_d,
                 POS, p_b, p_t,
                 INV_FREQ, n_tokens, T,
                 N_Q: tl.constexpr, N_KV: tl.constexpr, HALF: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # BLOCK_T tokens of the flattened B*T per program; (b, t) are recovered from the token index so any
    # strides work (q and k are usually views of the projections, not one contiguous [B*T, ...] block).
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tokens
    b = tok // T
    t = tok - b * T
    pos = tl.load(POS + b * p_b + t * p_t, mask=tok_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    f = tl.load(INV_FREQ + d, mask=d < HALF, other=0.0)
    # The same fp32 product as rope_cos_sin (int64 -> fp32, then one rounded multiply), so large positions
    # give the reference's angle bit for bit; cos/sin then stay fp32 (the reference rounds them to the
    # activation dtype). Computed once per token for all of its q and k heads.
    angle = pos.to(tl.float32)[:, None] * f[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if BACKWARD:
        # The rotation is orthogonal: its transpose, applied to the gradient, is the rotation by -angle.
        sin = -sin
    _rotate_heads(Q_SRC + b * qs_b + t * qs_t, qs_h, qs_d, Q_DST + b * qd_b + t * qd_t, qd_h, qd_d,
                  tok_ok, cos, sin, N_Q, BLOCK_HQ, HALF, BLOCK_D)
    _rotate_heads(K_SRC + b * ks_b + t * ks_t, ks_h, ks_d, K_DST + b * kd_b + t * kd_t, kd_h, kd_d,
                  tok_ok, cos, sin, N_KV, BLOCK_HK, HALF, BLOCK_D)
# fmt: on


def _rope_launch(q_src, q_dst, k_src, k_dst, position_ids, inv_freq, backward: bool) -> None:
    """Rotate q_src/k_src [B, T, n, hd] (any strides) into q_dst/k_dst (the same tensors for in place)."""
    B, T, n_q, hd = q_src.shape
    n_kv = k_src.shape[2]
    n_tokens = B * T
    if n_tokens == 0:
        return
    half = hd // 2
    pos = position_ids.expand(B, T)  # [1, T] broadcasts over the batch through a 0 stride, no copy
    block_d = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(n_q), triton.next_power_of_2(n_kv)
    block_t = max(1, min(16, TILE_PAIRS // (block_hq * block_d)))
    grid = (triton.cdiv(n_tokens, block_t),)
    _rope_kernel[grid](
        q_src, *q_src.stride(),
        q_dst, *q_dst.stride(),
        k_src, *k_src.stride(),
        k_dst, *k_dst.stride(),
        pos, *pos.stride(),
        inv_freq, n_tokens, T,
        N_Q=n_q, N_KV=n_kv, HALF=half, BACKWARD=backward,
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=4 if block_t * block_hq * block_d <= TILE_PAIRS else 8,
    )  # fmt: skip


class RoPEFunction(torch.autograd.Function):
    """In-place rotary embedding of q and k; `rope()` is the entry point (it picks what to dirty).

    Forward, per token with position p, frequency f_i = inv_freq[i] and angle a_i = fp32(p) * f_i:
        y[i]        = x[i] cos a_i - x[i + hd/2] sin a_i
        y[i + hd/2] = x[i + hd/2] cos a_i + x[i] sin a_i,      i < hd/2,
    i.e. y = R(a) x per pair, for every q head and k head, written over x.
    Backward: R(a) is orthogonal, so dx = R(a)^T dy = R(-a) dy (the same kernel with sin negated).

    Inputs are the tensors autograd sees modified (q_t, k_t: q and k themselves, or the projection
    outputs they are plain reshapes of) and the [B, T, n, hd] shapes to read them as. Saved for backward:
    only position_ids and inv_freq; the angles are recomputed, nothing of q or k is kept.

    The gradients are rotated into new tensors, not over the incoming ones: autograd may hand the same
    gradient tensor to several consumers (an add's backward passes one tensor to both of its inputs, and
    `backward(gradient=...)` passes the caller's), so writing over it could corrupt another branch or the
    caller's tensor. The cost is one transient q+k-sized buffer; the memory traffic is the same.
    """

    @staticmethod
    def forward(ctx, q_t, k_t, position_ids, inv_freq, q_shape, k_shape):
        q4, k4 = q_t.view(q_shape), k_t.view(k_shape)
        _rope_launch(q4, q4, k4, k4, position_ids, inv_freq, backward=False)
        ctx.mark_dirty(q_t, k_t)
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.shapes = (q_shape, k_shape)
        return q_t, k_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dq_out, dk_out):
        position_ids, inv_freq = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        # reshape is a view unless autograd hands over a gradient with an odd layout; the kernel takes any
        # strides either way.
        dq_src, dk_src = dq_out.reshape(q_shape), dk_out.reshape(k_shape)
        dq = torch.empty(q_shape, dtype=dq_out.dtype, device=dq_out.device)
        dk = torch.empty(k_shape, dtype=dk_out.dtype, device=dk_out.device)
        _rope_launch(dq_src, dq, dk_src, dk, position_ids, inv_freq, backward=True)
        return dq.view(dq_out.shape), dk.view(dk_out.shape), None, None, None, None


def _dirty_target(x: torch.Tensor, copy_views: bool) -> torch.Tensor:
    """The tensor to hand to RoPEFunction as the one modified in place.

    PyTorch refuses a Function that modifies a view in place and returns more than one tensor, and q and
    k are views in the model (`q_proj(x).view(B, T, n, hd)`). When the view is a plain reshape of its base
    (same elements, both contiguous), the base is what is dirtied: the same memory, and autograd then
    routes the gradient through the base, provided the base carries the view's autograd history (a view
    that a custom Function returned of an internal buffer does not). Other views (a slice of a fused QKV
    output, a transpose, such a Function's view) are
    copied first when autograd is recording, and the copy is rotated; without autograd they are rotated
    in place as they are.
    """
    base = x._base
    if base is None:
        return x
    if (
        base.requires_grad == x.requires_grad  # the base carries the view's history (not an internal buffer)
        and x.is_contiguous()
        and base.is_contiguous()
        and x.numel() == base.numel()
        and x.storage_offset() == base.storage_offset()
    ):
        return base
    return x.clone() if copy_views else x


def rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor):
    """Rotate q [B, T, n_q, hd] and k [B, T, n_kv, hd] by RoPE, in place; returns (q, k).

    position_ids [B, T] (or [1, T]) integer, restarting at 0 for each packed sequence; inv_freq [hd/2]
    fp32 on the same device (any scaling, e.g. Llama 3's, already applied: the kernel uses it as given).
    One kernel launch rotates both tensors; any strides are read and written as they are, no copy.

    In place: the returned tensors use q's and k's memory, and q and k themselves now hold the rotated
    values. Use the returned tensors afterwards (they carry the autograd history; for views of a
    projection they are fresh views of the same memory). The one exception, where the result is a copy
    and q/k are left as they were: a q or k that is a view but not a plain reshape of its base (e.g. a
    slice of a fused QKV output) while autograd is recording, since PyTorch cannot record an in-place
    change of such a view by a two-output Function. As with any in-place op, autograd raises at
    backward if something saved q or k (or their base) for its own backward.
    """
    if len({q.device, k.device, position_ids.device, inv_freq.device}) != 1:
        raise ValueError(
            "rope: q, k, position_ids and inv_freq must be on one device (keep inv_freq there, "
            "e.g. as a buffer: copying it each call would synchronise with the host)"
        )
    check_triton(q, k, position_ids, inv_freq, op="rope")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"rope: q [B, T, n_q, hd] and k [B, T, n_kv, hd] expected, got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    B, T, _, hd = q.shape
    if hd % 2 or inv_freq.shape != (hd // 2,):
        raise ValueError(
            f"rope: inv_freq must have head_dim/2 = {hd / 2} entries (head_dim even), got "
            f"{tuple(inv_freq.shape)}"
        )
    if inv_freq.dtype != torch.float32:
        raise ValueError(f"rope: inv_freq must be fp32 (the angles are fp32), got {inv_freq.dtype}")
    if position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
        raise ValueError(
            f"rope: position_ids must be [B, T] or [1, T] = [{B}, {T}], got {tuple(position_ids.shape)}"
        )
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"rope: position_ids must be integers, got {position_ids.dtype}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rope: q and k must share a dtype among fp32, fp16, bf16; got {q.dtype}, {k.dtype}")
    if q.numel() and q.data_ptr() == k.data_ptr():
        raise ValueError("rope: q and k are the same memory (each would be rotated twice)")
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    q_t, k_t = _dirty_target(q, recording), _dirty_target(k, recording)
    q_shape, k_shape = q.shape, k.shape
    q_t, k_t = RoPEFunction.apply(q_t, k_t, position_ids, inv_freq, q_shape, k_shape)
    return q_t.view(q_shape), k_t.view(k_shape)
