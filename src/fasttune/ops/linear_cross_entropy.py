"""The LM head and the cross-entropy loss in one op, without materialising the [N, V] logits.

Eager PyTorch computes logits = hidden @ weight.T for all N tokens, casts them to fp32 and keeps them for the
backward: 16k tokens of Qwen2.5's V = 151,936 vocabulary take 9.3 GiB in fp32 (plus 4.6 GiB for the bf16
logits). This op walks the tokens in chunks of C rows. For each chunk a torch matmul (cuBLAS) makes the
[C, V] logits, a Triton kernel turns each row into its loss and overwrites the row in place with the
gradient of the summed loss w.r.t. those logits, and two more matmuls turn that gradient into the
chunk's rows of grad_hidden and its share of grad_weight. Only one chunk of logits exists at a time.

Memory (Qwen2.5-0.5B: H 896, V 151,936, N tokens; "b" the bytes of the compute dtype, 2 for bf16):
  - one chunk of logits: C x V x b. The automatic chunk keeps it under a 512 MiB budget (see
    `_auto_chunk_size`): 1,536 tokens x 151,936 x 2 B = 445 MiB in bf16.
  - kept from the forward to the backward, in fp32 whatever the inputs' dtype (see the Function's
    docstring): grad_hidden [N, H] (16k tokens: 56 MiB) and grad_weight [V, H] (519 MiB); the backward
    returns them scaled and cast, [N, H] and [V, H] in the inputs' dtypes (28 + 260 MiB in bf16).
  - during the forward only: a copy of the weight in the compute dtype when it differs (autocast over
    fp32 weights: 260 MiB); on the CPU, fp32 copies of bf16/fp16 GEMM operands (the test path).
Eager PyTorch at 16k tokens: 4.6 GiB of bf16 logits + 9.3 GiB of fp32 logits, and their gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fasttune.ops import check_triton, interpreting
from fasttune.ops._rounding import round_to

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_cross_entropy_ref(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over targets != ignore_index, their number), the way the model computes it
    today: logits in the inputs' dtype (as lm_head), then cross-entropy in fp32. hidden [..., H], weight
    [V, H], targets [...] int64. Materialises [N, V] logits twice (input dtype and fp32).

    fp64 inputs stay fp64 throughout (`.float()` would round the tests' exact reference to fp32)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # .float(), but fp64 stays fp64
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: the forward's loss and dL/dlogits (one program per row of a logits chunk), the backward's
# scaling of the stored gradients by grad_output.


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    Z,  # [C, V] logits of one chunk, compute dtype; overwritten with dL/dZ when WRITE_GRAD
    stride_z,
    T,  # [C] targets (any integer dtype)
    LOSS,  # [C] fp32 per-row losses
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    # int64 row offsets: a chunk of C rows spans C x V elements, past 2^31 from 14,134 rows of V = 151,936.
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    target = tl.load(T + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: running max m and running sum d = sum exp(z - m) over the blocks of V, in fp32. Every block
    # holds at least one real column, so m is finite after the first block and exp(m_old - m_new) of the
    # initial -inf is 0, never NaN; masked columns load -inf and add exp(-inf) = 0.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # loss = lse - z[target]. A target outside [0, V) that is not ignore_index reads NaN instead of memory
    # outside the row: the loss turns NaN (the training loop's non-finite guard sees it) without the host
    # check that would cost a synchronisation.
    in_range = valid & (target >= 0) & (target < V)
    z_t = tl.load(z_row + tl.where(in_range, target, 0), mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))

    # Pass 2: dL/dz = softmax(z) - onehot(target), 0 for an ignored row, written over the logits it was
    # computed from (each element is read before it is written, by the same program).
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(offs == target, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.store(z_row + offs, round_to(g, Z.dtype.element_ty), mask=mask)


@triton.jit
def _linear_cross_entropy_bwd_kernel(SRC, GRAD_LOSS, DST, n, BLOCK: tl.constexpr):
    """DST = GRAD_LOSS * SRC: a stored fp32 gradient scaled by the scalar grad_output (read from device
    memory, never from the host) and rounded once to its input's dtype."""
    # int64 offsets: V x H passes 2^31 at V 151,936 from H 14,134 (and at V 262,144 from H 8,192).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GRAD_LOSS).to(tl.float32)
    x = tl.load(SRC + offs, mask=mask, other=0.0)
    tl.store(DST + offs, round_to(x * g, DST.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers and the chunk size


def _loss_and_grad_logits_(
    logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int, write_grad: bool
) -> None:
    """Per-row losses into `loss` [C] (fp32); with write_grad, logits [C, V] becomes dL/dlogits in place."""
    C, V = logits.shape
    # 4,096 columns per block: 16 fp32 values per thread at 8 warps, two 16-byte loads per thread in bf16;
    # V = 151,936 takes 38 blocks per pass. Small vocabularies use one block of the next power of two.
    block = min(4096, triton.next_power_of_2(V))
    _linear_cross_entropy_fwd_kernel[(C,)](
        logits,
        logits.stride(0),
        targets,
        loss,
        V,
        ignore_index,
        BLOCK_V=block,
        WRITE_GRAD=write_grad,
        num_warps=8 if block >= 2048 else 4,
    )


def _scale_cast(src: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_loss * src (fp32, contiguous) as a new tensor of `dtype`."""
    dst = torch.empty(src.shape, device=src.device, dtype=dtype)
    n = src.numel()
    if n:
        # 1,024 elements per program (8 per thread at 4 warps) on a GPU. The interpreter pays per program,
        # not per element, and each element is independent, so a larger block there changes no result.
        block = 16384 if interpreting() and src.device.type == "cpu" else 1024
        _linear_cross_entropy_bwd_kernel[(triton.cdiv(n, block),)](
            src, grad_loss.float(), dst, n, BLOCK=block, num_warps=4
        )
    return dst


# The largest logits chunk the automatic chunk size allows. The chunk is the op's only tensor that grows with
# V x tokens; half a GiB is small next to the fp32 logits eager keeps (9.3 GiB at 16k tokens) and next to
# what the rest of a step holds, and large enough for efficient GEMMs (below).
_CHUNK_BYTES = 512 * 2**20
# Chunks are multiples of 256 tokens (whole tensor-core tiles in M and K), and never fewer than 256.
_CHUNK_MULTIPLE = 256


def _auto_chunk_size(n_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per chunk: the largest multiple of 256 whose logits (C x V x itemsize) fit in 512 MiB.

    Qwen2.5-0.5B (V 151,936): one token's logits take 303,872 B in bf16, so 512 MiB holds 1,766 tokens and C
    = 1,536 (445 MiB); in fp32, 883 tokens and C = 768 (445 MiB). Llama 3 (V 128,256), bf16: C = 1,792.

    Why not smaller: each chunk's weight-gradient GEMM adds into the fp32 [V, H] accumulator, reading and
    writing 8 B per element for 2 C FLOPs per element, C / 4 FLOP per byte. That is compute-bound only
    from C ~ 1,200 on an H100 (989 TFLOP/s bf16 / 3.35 TB/s = 295 FLOP/B) and C ~ 660 on an RTX 4090
    (165 / 1.0); at C = 1,536 the GEMM costs 2 x 1,536 x 896 x 151,936 = 418 GFLOP = 0.42 ms at the H100's
    peak against 0.33 ms for the 1.09 GB of accumulator traffic. (Sizing the chunk to N x H / V, as
    Liger-Kernel does, gives 128 tokens at H 896, where that traffic would take 9 times the GEMM.) The logits
    GEMM [C, H] x [H, V] and the grad_hidden GEMM are then as large: 0.42 ms each.
    """
    c = _CHUNK_BYTES // (vocab * itemsize) // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE
    return max(1, min(max(c, _CHUNK_MULTIPLE), n_tokens))


# Whether this torch's cuBLAS path takes bf16/fp16 operands with an fp32 output added in place
# (torch.addmm(..., out_dtype=torch.float32), torch 2.8+; some versions also require `input` in the operands'
# dtype). Probed once on a 16 x 16 product: only host-side argument checks can fail, nothing is read back.
_FP32_OUT_ADDMM: dict[str, bool] = {}


def _fp32_out_addmm(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if "cuda" not in _FP32_OUT_ADDMM:
        a = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
        acc = torch.zeros(16, 16, device=device, dtype=torch.float32)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FP32_OUT_ADDMM["cuda"] = True
        except (RuntimeError, TypeError):
            _FP32_OUT_ADDMM["cuda"] = False
    return _FP32_OUT_ADDMM["cuda"]


def _mm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or out += a @ b, for a and b in the compute dtype.

    bf16/fp16 operands: their products are exact in fp32 and only the fp32 sums round, as in eager's GEMMs.
    cuBLAS writes (or adds into) the fp32 output in its epilogue (out_dtype); the CPU (the interpreter's
    tests) multiplies fp32 copies, which is the same arithmetic. A CUDA torch without out_dtype rounds each
    chunk's product to the compute dtype first (one more rounding per chunk), rather than running an fp32
    GEMM (16x slower than bf16 on an H100 without TF32).
    """
    beta = 1 if accumulate else 0  # beta = 0 ignores out's old contents, NaN included
    if a.dtype == torch.float32:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif _fp32_out_addmm(out.device):
        torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)
    elif out.device.type == "cpu":
        torch.addmm(out, a.float(), b.float(), beta=beta, out=out)
    elif accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def _linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, chunk, dtype, need_dh, need_dw):
    """Loss sum (fp32 0-dim) and, for grad_output = 1, grad_hidden [N, H] and grad_weight [V, H] in fp32
    (None where not needed)."""
    N = hidden.shape[0]
    w = weight.to(dtype)  # the weight itself when it already has the compute dtype
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)
    # Both gradients stay fp32 until the backward has multiplied them by grad_output: rounded to bf16 here,
    # they would be rounded a second time by that product. grad_weight also sums N / C chunk products, in
    # fp32 as eager's single GEMM over all N tokens sums them.
    f32 = dict(device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty(hidden.shape, **f32) if need_dh else None
    grad_weight = torch.zeros(weight.shape, **f32) if need_dw else None
    # ceil(N / chunk) chunks of near-equal size (they differ by at most one row), never `chunk` rows and a
    # short tail: 16,385 tokens at C = 1,536 run 11 GEMMs of 1,489-1,490 rows, not 10 of 1,536 and one
    # single-row GEMV (slow on a GPU, and a less accurate sequential sum over V on the CPU's BLAS).
    n_chunks = -(-N // chunk)
    bounds = [i * N // n_chunks for i in range(n_chunks + 1)]
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        h = hidden[s:e].to(dtype)
        logits = h @ w.T  # [c, V]: the only V-sized tensor
        _loss_and_grad_logits_(logits, targets[s:e], losses[s:e], ignore_index, need_dh or need_dw)
        if need_dh:
            _mm_fp32_(grad_hidden[s:e], logits, w, accumulate=False)
        if need_dw:
            _mm_fp32_(grad_weight, logits.T, h, accumulate=True)
        del logits  # free this chunk before the next one is allocated
    return losses.sum(), grad_hidden, grad_weight


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The logits' dtype: autocast's when autocast is on for hidden's device (as lm_head under autocast),
    else hidden's. The weight (and under autocast, hidden) is cast to it for the GEMMs only; gradients come
    back in each input's own dtype, grad_weight accumulated in fp32."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


# ----------------------------------------------------------------------------------------------------------
# Autograd


class LinearCrossEntropyFunction(torch.autograd.Function):
    """L = sum_i [y_i != ignore] (lse_i - z_{i,y_i}),  z = h W^T,  lse_i = log sum_v exp z_{iv}.

    Gradient: with G_{iv} = dL/dz_{iv} = [y_i != ignore] (softmax(z_i)_v - [v = y_i]),
        dL/dh = G W  [N, H]     dL/dW = G^T h = sum over chunks c of G_c^T h_c  [V, H].
    Row i of G needs only row i of z, so G is formed chunk by chunk and each chunk is consumed at once.

    Why in the forward (the technique of Liger-Kernel, re-derived): L is a scalar, so for whatever
    objective l is computed from it the backward receives one number g = dl/dL, and the chain rule gives
        dl/dh = g (G W),   dl/dW = g (G^T h).
    G W and G^T h do not depend on g: the forward computes them while the chunk's logits exist, stores
    them, and the backward only scales them by g. Recomputing the logits in the backward instead would
    cost a fourth [N, H] x [H, V] GEMM; the forward here does three (2 N H V FLOPs each), as many as eager's
    forward and backward together. The price: grad_hidden [N, H] and grad_weight [V, H] live from the
    forward to the backward (the inputs and targets are not saved), the forward pays for gradients even if
    backward never runs (it skips them under no_grad or for inputs that do not require grad), and a tied
    weight gets its head gradient as an ordinary gradient of `weight`, so autograd adds it to the
    embedding's in the shared Parameter.

    Precision: logits in the compute dtype (as lm_head); max, log-sum-exp, loss and softmax in fp32; G is
    rounded once to the compute dtype (eager rounds its fp32 dlogits to the same dtype in the backward of
    `.float()`); both gradient GEMMs produce fp32 (grad_weight summed over the chunks in fp32), kept in
    fp32 until the backward, which rounds g x gradient once to the input's dtype, where eager rounds
    its GEMM's output once. Storing them in bf16 would halve what is kept ([V, H] x 2 B less: 260 MiB for
    Qwen2.5-0.5B) but round twice whenever g != 1 (the mean loss's g = 1 / n_targets): up to one ulp of
    error where eager has half an ulp.

    fp16: G is formed before g is known, so a GradScaler's scale cannot lift its small entries out of
    fp16's subnormal range as it does in eager's backward (softmax values ~1/V ~ 7e-6 are subnormals,
    precise to ~7 bits instead of 11). bf16 has fp32's range and does not have this problem.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, dtype, need_dh, need_dw):
        # The dtype was chosen by the caller (autocast included); the GEMMs here must not be re-cast.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _linear_cross_entropy_fwd(
                hidden, weight, targets, ignore_index, chunk, dtype, need_dh, need_dw
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Into new tensors: a second backward over a retained graph (retain_graph=True) must find the stored
        # gradients unscaled. No shortcut for g == 1 either: testing it would read g on the host.
        dh = _scale_cast(grad_hidden, grad_loss, ctx.dtypes[0]) if grad_hidden is not None else None
        dw = _scale_cast(grad_weight, grad_loss, ctx.dtypes[1]) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_targets): the summed cross-entropy of softmax(hidden @ weight.T) against targets, fp32
    0-dim, and the number of targets that are not ignore_index, int64 0-dim; the mean loss is their ratio.

    hidden [N, H] or [B, T, H] (fp32, fp16 or bf16), weight [V, H] (any of those: cast to the compute dtype,
    see `_compute_dtype`), targets [N] or [B, T] integers. Rows whose target is ignore_index add 0 to the
    loss and the gradients. chunk_size: tokens per logits chunk, None for `_auto_chunk_size`'s budget.
    Never synchronises with the host; a target outside [0, V) gives a NaN loss.
    """
    check_triton(hidden, weight, targets, op="linear_cross_entropy")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} must be [V, {H}] for hidden "
            f"{tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must have hidden's leading "
            f"shape {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(
            f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} must be "
            "float32, float16 or bfloat16"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")

    dtype = _compute_dtype(hidden, weight)
    hidden = hidden.reshape(-1, H)
    targets = targets.reshape(-1).contiguous()
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or _auto_chunk_size(N, V, dtype.itemsize)
    grad_on = torch.is_grad_enabled()
    loss = LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        targets,
        ignore_index,
        chunk,
        dtype,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    return loss, (targets != ignore_index).sum()
