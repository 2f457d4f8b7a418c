"""Causal attention over packed (variable-length) sequences.

One public function, `attention(q, k, v, cu_seqlens, ..., backend=...)`, with the backend a property of the
model (each `Attention` module's `backend`), set once per run by `set_attention_backend(model, name)` from
the run's `attention` key, and logged there:

* `flash`: flash-attn's varlen kernel (CUDA, fp16/bf16, when the optional `flash-attn` package is
  installed). Packed sequences cost nothing extra: cu_seqlens goes straight to the kernel.
* `sdpa`: the reference, any device and dtype. `torch.nn.functional.scaled_dot_product_attention` with
  `is_causal=True`, run once per packed sequence so that no token attends across a boundary. The loop
  reads cu_seqlens on the host (one sync per call): correct everywhere, fast only for few sequences.
* `auto`: flash where it can run (CUDA, fp16/bf16, installed), sdpa elsewhere, decided per device type
  and dtype (a bf16-trained model evaluated in fp32 takes sdpa) and logged at the first call of each.

Asking for `flash` where it cannot run is an error, at `set_attention_backend` for the run's device and
dtype and again at a call on other tensors: never a silent fallback.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fasttune.choices import ATTENTION

log = logging.getLogger("fasttune")

BACKENDS = ATTENTION
# (requested, device type, dtype) -> the backend that runs: a memo of a pure decision, so that a forward
# pays one dict read (torch.compile guards on it) and each decision is logged once.
_decided: dict[tuple[str, str, torch.dtype], str] = {}


def set_attention_backend(model, name: str = "auto", device=None, dtype=None) -> str:
    """Set the attention backend of every attention layer of `model`; returns (and logs) what runs for
    tensors on `device` of `dtype` (default: the model's parameters'); raises if `name` cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or p.dtype
    runs, why = _decide(name, device, dtype)
    _log(device, dtype, runs, why)
    _decided[(name, device.type, dtype)] = runs
    for m in model.modules():
        if hasattr(type(m), "backend"):  # the model's Attention modules (and their fused twins)
            m.backend = name
    model.info.attention = name
    return runs


def decide_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for `requested` on tensors of `device` and `dtype`; logged the first time."""
    key = (requested, device.type, dtype)
    if key not in _decided:
        runs, why = _decide(requested, device, dtype)
        _log(device, dtype, runs, why)
        _decided[key] = runs
    return _decided[key]


def _decide(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    reason = _flash_unavailable_reason(device, dtype)
    if requested == "flash" and reason:
        raise RuntimeError(f"attention backend 'flash' was requested but cannot run: {reason}")
    if requested == "sdpa":
        return "sdpa", "requested"
    if reason is None:
        return "flash", "flash-attn varlen kernel"
    return "sdpa", f"reference path, one SDPA call per sequence; flash unavailable: {reason}"


def _log(device: torch.device, dtype: torch.dtype, name: str, why: str) -> None:
    log.info("attention backend for %s/%s: %s (%s)", device.type, str(dtype).replace("torch.", ""), name, why)


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


def attention(q, k, v, cu_seqlens=None, max_seqlen=None, scale=None, sliding_window=None, backend="sdpa"):
    """Causal attention. q [B, T, n_q, hd]; k, v [B, T, n_kv, hd] with n_q a multiple of n_kv (GQA).

    With `cu_seqlens` (int32 [N+1], B = 1) each of the N packed sequences attends only within itself.
    `sliding_window` W lets a query see the W most recent keys (itself included), as Mistral does.
    `backend`: "sdpa", "flash" or "auto" (see the module's docstring). Returns [B, T, n_q, hd].
    """
    if decide_backend(backend, q.device, q.dtype) == "flash":
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
