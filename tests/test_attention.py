"""Variable-length causal attention: the SDPA reference against a naive fp64 implementation (GQA, packed
sequences, sliding window), the backend choice and its log line, and flash-attn on a GPU."""

import logging

import pytest
import torch

from fasttune.models import attention as attn


def naive(q, k, v, cu_seqlens, window=None):
    """fp64 softmax(q k^T / sqrt(hd) + mask) v with an explicit [T, T] mask: same sequence, causal, window."""
    q, k, v = (t.double() for t in (q, k, v))
    T, n_q, hd = q.shape[1:]
    k, v = (t.repeat_interleave(n_q // t.shape[2], dim=2) for t in (k, v))
    seq = torch.zeros(T, dtype=torch.long)
    for b in cu_seqlens[1:-1].tolist():
        seq[b:] += 1
    i = torch.arange(T)
    allowed = (seq[:, None] == seq[None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n_q, n_kv, hd", [(6, 2, 10), (7, 7, 16), (14, 2, 64)])
@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_naive_fp64(dtype, tol, n_q, n_kv, hd, window):
    g = torch.Generator().manual_seed(0)
    lens = [3, 1, 17, 9]
    T = sum(lens)
    cu = torch.tensor([0, 3, 4, 21, 30], dtype=torch.int32)
    q = torch.randn(1, T, n_q, hd, generator=g).to(dtype)
    k = torch.randn(1, T, n_kv, hd, generator=g).to(dtype)
    v = torch.randn(1, T, n_kv, hd, generator=g).to(dtype)
    out = attn.attention_ref(q, k, v, cu, scale=hd**-0.5, sliding_window=window)
    expected = naive(q, k, v, cu, window)
    assert out.dtype == dtype and out.shape == (1, T, n_q, hd)
    assert (out.double() - expected).abs().max() < tol


def test_unpacked_batch_is_plain_causal():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 11, 4, 8, generator=g) for _ in range(3))
    out = attn.attention_ref(q, k, v, scale=8**-0.5)
    for b in range(3):
        ref = naive(q[b : b + 1], k[b : b + 1], v[b : b + 1], torch.tensor([0, 11]))
        assert (out[b : b + 1].double() - ref).abs().max() < 1e-5


def test_backend_choice_is_logged_and_forcing_flash_where_it_cannot_run_fails(caplog):
    from fasttune.models.model import CausalLM, ModelConfig

    model = CausalLM(ModelConfig("qwen2", 32, 16, 24, 1, 2, 1, 8))
    with caplog.at_level(logging.INFO, logger="fasttune"):
        assert attn.set_attention_backend(model, "auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert "attention backend for cpu/float32: sdpa (reference path" in caplog.text
    assert "flash unavailable: flash-attn needs CUDA tensors" in caplog.text
    assert model.info.attention == "auto"
    with pytest.raises(RuntimeError, match="'flash' was requested but cannot run: flash-attn needs CUDA"):
        attn.set_attention_backend(model, "flash", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="'flash' was requested but cannot run: flash-attn needs CUDA"):
        attn.attention(*(torch.zeros(1, 3, 2, 4) for _ in range(3)), backend="flash")
    with pytest.raises(ValueError, match="not one of"):
        attn.set_attention_backend(model, "xformers")


def test_the_backend_belongs_to_the_model_not_the_process():
    # Two models in one process keep their own backends (the old process-global setting leaked).
    from fasttune.models.model import Attention, CausalLM, ModelConfig

    a, b = (CausalLM(ModelConfig("qwen2", 32, 16, 24, 1, 2, 1, 8)) for _ in range(2))
    attn.set_attention_backend(a, "sdpa")
    attn.set_attention_backend(b, "auto")
    assert {m.backend for m in a.modules() if isinstance(m, Attention)} == {"sdpa"}
    assert {m.backend for m in b.modules() if isinstance(m, Attention)} == {"auto"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_varlen_matches_reference_on_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 58, 116, 200, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 1000, 14, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1000, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    out = attn.attention(q, k, v, cu, max_seqlen=800, scale=0.125, backend="flash")
    expected = naive(q.cpu(), k.cpu(), v.cpu(), cu.cpu())
    assert (out.cpu().double() - expected).abs().max() < 2e-2
