"""SwiGLU kernel against fp64, as error ratios to PyTorch in the same dtype."""

from __future__ import annotations

import pytest
import torch

from fasttune.ops.swiglu import swiglu, swiglu_ref
from helpers import assert_fp64_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Small odd; non-power-of-two widths; Qwen2.5-0.5B's I = 4864 with 64 tokens; a packed [1, T, I] batch.
SHAPES = {"small": (3, 5, 7), "i60": (13, 60), "i896": (9, 896), "qwen": (64, 4864), "packed": (1, 37, 4864)}


def _forward_backward(fn, gate, up, dy):
    leaves = [gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu(dtype, shape):
    g = torch.Generator().manual_seed(0)
    # gate spread over silu's curved part and both tails; up and dy of unit scale.
    gate = (3 * torch.randn(shape, generator=g)).to(dtype)
    up, dy = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    got = _forward_backward(swiglu, gate, up, dy)
    same = _forward_backward(swiglu_ref, gate, up, dy)
    exact = _forward_backward(swiglu_ref, gate.double(), up.double(), dy.double())
    for name, a, b, e in zip(["y", "dgate", "dup"], got, same, exact, strict=True):
        assert_fp64_close(name, a, b, e)
        assert a.dtype == dtype
        if dtype != torch.float32:
            # One rounding of an fp32 result to nearest: it differs from the correctly rounded fp64 value
            # only where fp32's error crosses a rounding boundary (~1e-4 of elements here). Truncation, as
            # a plain fp32 -> bf16 cast does in the interpreter, misses half of them.
            assert (a != e.to(dtype)).double().mean() < 0.01, name


def test_swiglu_non_contiguous_and_inputs_untouched():
    """Halves of one fused gate_up projection are strided views; the backward writes new tensors, so the
    inputs (leaves here) keep their values."""
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(7, 2 * 60, generator=g)
    gate, up = (t.requires_grad_() for t in gate_up.clone().chunk(2, dim=-1))
    before = gate_up.clone()
    assert not gate.is_contiguous()
    y = swiglu(gate, up)
    torch.testing.assert_close(y, swiglu_ref(gate, up))
    dy = torch.randn(y.shape, generator=g)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    dg_ref, du_ref = torch.autograd.grad(swiglu_ref(gate, up), (gate, up), dy)
    torch.testing.assert_close(dg, dg_ref)
    torch.testing.assert_close(du, du_ref)
    assert torch.equal(torch.cat([gate, up], dim=-1), before)


def test_swiglu_retain_graph_twice():
    """A second backward over a retained graph gives the same gradients (nothing saved was overwritten)."""
    g = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(4, 60, generator=g).requires_grad_() for _ in range(2))
    y = swiglu(gate, up)
    dy = torch.randn(y.shape, generator=g)
    first = torch.autograd.grad(y, (gate, up), dy, retain_graph=True)
    second = torch.autograd.grad(y, (gate, up), dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_swiglu_mismatched_inputs():
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="differ"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16))


def test_swiglu_needs_triton_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="swiglu: Triton kernels need CUDA tensors"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8))
