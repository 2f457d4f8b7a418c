"""The LM head and cross-entropy in PyTorch, a chunk of tokens at a time (the `kernels="torch"` path, which
CPU runs take): the [T, V] logits are never whole.

Why: eager `F.cross_entropy(lm_head(h).float(), ...)` keeps [T, V] fp32 log-probabilities for the
backward and makes two more [T, V] fp32 gradients in it, 12 V bytes per token: at 2,048 tokens of Qwen2.5's
151,936-token vocabulary 3.5 GiB, the largest single part of a CPU step of Qwen2.5-0.5B (measured peak
23.4 GB on a 24 GB machine). Here the forward keeps only each token's logsumexp (4 B) and the backward
recomputes one chunk's logits at a time: d loss / d z = softmax(z) - onehot(target), times the output's
gradient. The extra cost is one more head GEMM (2 T H V FLOPs) in the backward.

The numbers are the eager ones: logits in the inputs' dtype (as `lm_head` makes them, bf16 under
autocast), then fp32; the gradient of the logits rounded to the inputs' dtype before the two GEMMs, as the
backward of `.float()` does. Only the order of the sums over chunks differs.
"""

from __future__ import annotations

import torch

# fp32 logits of one chunk; about 3 such buffers live at once (the compute-dtype logits, their fp32 copy, the
# logsumexp's temporary). 64 MiB is 110 tokens of V = 151,936: a [110, 896] x [896, V] GEMM still runs at
# the CPU's GEMM speed, and 19 chunks per 2,048 tokens cost nothing next to it.
CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: the [C, V] fp32 logits within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(sum of the cross-entropy over targets != -100, their count) for hidden [N, H], weight [V, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = (hidden[s : s + chunk] @ weight.T).float()
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, safe[s : s + chunk, None])[:, 0]
            total += ((lse[s : s + chunk] - picked) * valid[s : s + chunk]).sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk = chunk
        return total, valid.sum()

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            g = (h @ weight.T).float()
            g.sub_(lse[s : s + chunk, None]).exp_()  # softmax(z)
            g[torch.arange(g.shape[0], device=g.device), safe[s : s + chunk]] -= 1
            g.mul_((valid[s : s + chunk] * grad_total)[:, None])
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = g @ weight
            if ctx.needs_input_grad[1]:
                grad_weight += (g.T @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T over targets != -100 (hidden [..., H], targets
    [...]), as `F.cross_entropy(lm_head(hidden).float(), targets, ignore_index=-100)`. chunk: tokens per
    chunk (default `chunk_tokens(V)`)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast casts lm_head's inputs, then run without it
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk = chunk or chunk_tokens(weight.shape[0])
    with torch.autocast(device, enabled=False):
        total, count = ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk
        )
    return total / count
