"""Causal attention over packed (variable-length) sequences.

One public function, `attention(q, k, v, cu_seqlens, ...)`, and a backend chosen once per device type and
dtype, logged when chosen:

* `flash`: flash-attn's varlen kernel (CUDA, fp16/bf16, when the optional `flash-attn` package is
  installed). Packed sequences cost nothing extra: cu_seqlens goes straight to the kernel.
* `sdpa`: the reference, any device and dtype. `torch.nn.functional.scaled_dot_product_attention` with
  `is_causal=True`, run once per packed sequence so that no token attends across a boundary. The loop
  reads cu_seqlens on the host (one sync per call): correct everywhere, fast only for few sequences.

`set_attention_backend("sdpa" | "flash" | "auto")` forces a choice; asking for `flash` where it cannot
run is an error, never a silent fallback.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("fasttune")

BACKENDS = ("auto", "sdpa", "flash")
_requested = "auto"
_chosen: dict[tuple[str, torch.dtype], str] = {}


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    global _requested
    _requested = name
    _chosen.clear()


def _flash_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"flash-attn needs CUDA tensors (got {device.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16 (got {dtype})"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash-attn package is not installed (pip install 'fasttune[flash]')"
    return None


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend used for tensors on `device` of `dtype`; chosen and logged at the first call."""
    key = (device.type, dtype)
    if key in _chosen:
        return _chosen[key]
    reason = _flash_unavailable_reason(device, dtype)
    if _requested == "flash" and reason:
        raise RuntimeError(f"attention backend 'flash' was requested but cannot run: {reason}")
    if _requested == "sdpa":
        name, why = "sdpa", "requested"
    elif reason is None:
        name, why = "flash", "flash-attn varlen kernel"
    else:
        name, why = "sdpa", f"reference path, one SDPA call per sequence; flash unavailable: {reason}"
    log.info("attention backend for %s/%s: %s (%s)", device.type, str(dtype).replace("torch.", ""), name, why)
    _chosen[key] = name
    return name


def attention(q, k, v, cu_seqlens=None, max_seqlen=None, scale=None, sliding_window=None):
    """Causal attention. q [B, T, n_q, hd]; k, v [B, T, n_kv, hd] with n_q a multiple of n_kv (GQA).

    With `cu_seqlens` (int32 [N+1], B = 1) each of the N packed sequences attends only within itself.
    `sliding_window` W lets a query see the W most recent keys (itself included), as Mistral does.
    Returns [B, T, n_q, hd].
    """
    backend = attention_backend(q.device, q.dtype)
    if backend == "flash":
        return _flash(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window)
    return attention_ref(q, k, v, cu_seqlens, scale, sliding_window)


def attention_ref(q, k, v, cu_seqlens=None, scale=None, sliding_window=None):
    """The reference: SDPA per sequence, k/v heads repeated for GQA as transformers does."""
    if cu_seqlens is None:
        return _sdpa(q, k, v, scale, sliding_window)
    bounds = cu_seqlens.tolist()
    if (
        bounds[0] != 0
        or bounds[-1] != q.shape[1]
        or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True))
    ):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the packed length T={q.shape[1]}")
    # torch.split, not slicing: a slice's backward writes a zero tensor of the whole row, which for N
    # sequences is N x T of memory traffic (measured: 2.8 s of a 3.6 s backward at 99 sequences of 4,096
    # tokens); split's backward is one concatenation.
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    parts = zip(*(torch.split(t, lengths, dim=1) for t in (q, k, v)), strict=True)
    return torch.cat([_sdpa(qs, ks, vs, scale, sliding_window) for qs, ks, vs in parts], dim=1)


def _sdpa(q, k, v, scale, sliding_window):
    n_rep = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, n, T, hd]
    if n_rep > 1:
        k, v = (t.repeat_interleave(n_rep, dim=1) for t in (k, v))
    T = q.shape[2]
    if sliding_window is not None and T > sliding_window:
        i = torch.arange(T, device=q.device)
        rel = i[:, None] - i[None, :]
        mask = (rel >= 0) & (rel < sliding_window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        # Queries and keys always have the same length here (no KV cache), so causal holds even for T = 1;
        # a constant also keeps torch.compile from a symbolic-bool graph break.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return o.transpose(1, 2)


def _flash(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    # flash-attn's window (left, right) counts keys besides the query's own: W most recent = (W - 1, 0).
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())  # a host sync: the packer passes max_seqlen instead
    o = flash_attn_varlen_func(
        q[0], k[0], v[0], cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True, window_size=window
    )
    return o.unsqueeze(0)
