"""RMSNorm kernel (with and without the fused residual add) against fp64, as error ratios to PyTorch."""

from __future__ import annotations

import pytest
import torch

from fasttune.ops.rms_norm import rms_norm, rms_norm_ref
from helpers import assert_fp64_close

EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Small odd; non-power-of-two H; Qwen2.5-0.5B's H with 64 tokens; a packed [1, T, H] batch.
SHAPES = {"small": (3, 5, 7), "h60": (2, 13, 60), "qwen": (64, 896), "packed": (1, 37, 896)}


def _inputs(shape, dtype, w_dtype=None, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype)
    # Weights near 1 but not 1, so that a kernel ignoring or mis-indexing them fails.
    w = (1 + 0.2 * torch.randn(H, generator=g)).to(w_dtype or dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    return x, w, r, g


def _forward_backward(fn, x, w, r, grads):
    """Outputs and the gradients of (x, w[, r]) for the given output gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, r) if t is not None]
    out = fn(*leaves[:2], EPS, *leaves[2:])
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads[: len(outs)]))


def _check(x, w, r, g, names):
    y_dtype = torch.promote_types(w.dtype, x.dtype)
    grads = [torch.randn(x.shape, generator=g).to(y_dtype)]
    if r is not None:
        grads.append(torch.randn(x.shape, generator=g).to(x.dtype))
    got = _forward_backward(rms_norm, x, w, r, grads)
    same = _forward_backward(rms_norm_ref, x, w, r, grads)
    exact = _forward_backward(
        rms_norm_ref, x.double(), w.double(), None if r is None else r.double(), [t.double() for t in grads]
    )
    assert len(got) == len(names)
    for name, a, b, e in zip(names, got, same, exact, strict=True):
        assert_fp64_close(name, a, b, e)
    return got


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype, shape):
    x, w, _, g = _inputs(shape, dtype)
    y, dx, dw = _check(x, w, None, g, ["y", "dx", "dw"])
    assert y.dtype == dx.dtype == dw.dtype == dtype
    if dtype != torch.float32:
        # The forward rounds where PyTorch does (xhat, then w * xhat), to nearest: the two differ only
        # where the fp32 statistics differ by an ulp across a rounding boundary (none in these cases).
        assert (y != rms_norm_ref(x, w, EPS)).double().mean() < 0.01


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_residual(dtype, shape):
    """The fused add returns h = x + residual; its gradient joins the norm's, for x and residual alike."""
    x, w, r, g = _inputs(shape, dtype, residual=True)
    y, h, dx, dw, dr = _check(x, w, r, g, ["y", "h", "dx", "dw", "dresidual"])
    assert torch.equal(h, x + r)  # one rounding of the fp32 sum, bit for bit PyTorch's add
    assert torch.equal(dx, dr)
    assert y.dtype == h.dtype == dx.dtype == dr.dtype == dw.dtype == dtype


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_mixed_precision(dtype, residual):
    """fp32 weight with 16-bit activations: y is fp32 (as transformers), dw fp32, dx in x's dtype."""
    x, w, r, g = _inputs(SHAPES["packed"], dtype, w_dtype=torch.float32, residual=residual)
    names = ["y", "h", "dx", "dw", "dresidual"] if residual else ["y", "dx", "dw"]
    out = dict(zip(names, _check(x, w, r, g, names), strict=True))
    assert out["y"].dtype == torch.float32 and out["dw"].dtype == torch.float32
    assert out["dx"].dtype == dtype


def test_rms_norm_non_contiguous():
    """A transposed view of x (and of the residual) gives the values of its contiguous copy."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 9, generator=g).t()
    r = torch.randn(60, 9, generator=g).t()
    w = 1 + 0.2 * torch.randn(60, generator=g)
    assert not x.is_contiguous()
    y, h = rms_norm(x, w, EPS, residual=r)
    y_ref, h_ref = rms_norm_ref(x, w, EPS, residual=r)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(h, h_ref)
    _check(x, w, None, g, ["y", "dx", "dw"])


def test_rms_norm_frozen_weight_and_unused_outputs():
    """LoRA freezes the norms: no dw then. With only y used, dx = dresidual is the norm's gradient alone;
    with only h used, it is h's gradient passed through unchanged."""
    x, w, r, g = _inputs((5, 60), torch.float32, residual=True)
    x.requires_grad_()
    r.requires_grad_()
    y, h = rms_norm(x, w, EPS, residual=r)
    dy = torch.randn(y.shape, generator=g)
    dx, dr = torch.autograd.grad(y, (x, r), dy, retain_graph=True)
    y_ref, _ = rms_norm_ref(x, w, EPS, residual=r)
    torch.testing.assert_close(dx, torch.autograd.grad(y_ref, x, dy)[0])
    assert torch.equal(dx, dr)
    dh = torch.randn(h.shape, generator=g)
    dx, dr = torch.autograd.grad(h, (x, r), dh)
    torch.testing.assert_close(dx, dh, rtol=0, atol=0)
    torch.testing.assert_close(dr, dh, rtol=0, atol=0)


def test_rms_norm_shape_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, torch.ones(8), EPS, residual=torch.randn(4, 7))


def test_rms_norm_needs_triton_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="rms_norm: Triton kernels need CUDA tensors"):
        rms_norm(torch.randn(2, 8), torch.ones(8), EPS)
