"""RoPE kernel (q and k together, in place) against fp64, as error ratios to PyTorch; the in-place
contract and its interplay with autograd."""

from __future__ import annotations

import pytest
import torch

from fasttune.models.model import ModelConfig, rope_inv_freq
from fasttune.ops import interpreting
from fasttune.ops.rope import rope, rope_ref
from helpers import assert_fp64_close

# On a GPU machine (no interpreter) the same tests run on CUDA, which is where the bf16 rounding, NaN and
# cos/sin paths meet the real hardware.
DEVICE = "cpu" if interpreting() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, n_q, n_kv, hd): small odd (hd/2 = 5, not a power of two); Qwen2.5-0.5B's heads with T cut to
# 64; Qwen3's head_dim 128 (Qwen3-0.6B's 16:8 heads).
SHAPES = {"small": (2, 5, 6, 2, 10), "qwen2.5": (2, 64, 14, 2, 64), "qwen3": (1, 32, 16, 8, 128)}


def _inv_freq(hd, theta=1e6):
    return (1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))).to(DEVICE)


def _llama3_inv_freq(hd):
    """Llama 3.1's scaled frequencies, through the model's own config parsing."""
    cfg = ModelConfig.from_hf(
        dict(
            model_type="llama",
            vocab_size=128,
            hidden_size=14 * hd,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=hd,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    return rope_inv_freq(cfg).to(DEVICE)


def _packed_positions(T, g):
    """One packed row [1, T]: positions restart at 0 for each document (lengths 3 to 40)."""
    parts, n = [], 0
    while n < T:
        L = min(int(torch.randint(3, 41, (), generator=g)), T - n)
        parts.append(torch.arange(L))
        n += L
    return torch.cat(parts)[None].to(DEVICE)


def _qk(shape, dtype, g):
    B, T, n_q, n_kv, hd = shape
    q = torch.randn(B, T, n_q, hd, generator=g).to(DEVICE, dtype)
    return q, torch.randn(B, T, n_kv, hd, generator=g).to(DEVICE, dtype)


def _forward_backward(fn, q, k, pos, inv_freq, grads):
    """Outputs and (dq, dk) for the given output gradients. The kernel rotates in place, which autograd
    forbids on leaves, so it gets non-leaf copies; the gradients are those of the leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    outs = fn(*(t.clone() for t in leaves), pos, inv_freq)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads))


def _check(q, k, pos, inv_freq, g):
    grads = [torch.randn(t.shape, generator=g).to(DEVICE, t.dtype) for t in (q, k)]
    got = _forward_backward(rope, q, k, pos, inv_freq, grads)
    same = _forward_backward(rope_ref, q, k, pos, inv_freq, grads)
    # rope_ref on fp64 inputs: the same fp32 angles and cos/sin, fp64 multiply-adds.
    exact = _forward_backward(rope_ref, q.double(), k.double(), pos, inv_freq, [t.double() for t in grads])
    for name, a, b, e in zip(["q", "k", "dq", "dk"], got, same, exact, strict=True):
        assert_fp64_close(name, a, b, e)
    return got


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope(dtype, shape):
    g = torch.Generator().manual_seed(0)
    B, T, *_, hd = shape
    q, k = _qk(shape, dtype, g)
    pos = torch.randint(0, 4096, (B, T), generator=g).to(DEVICE)
    outs = _check(q, k, pos, _inv_freq(hd), g)
    assert all(o.dtype == dtype for o in outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_packed_row_llama3(dtype):
    # One [1, T] row of packed documents, positions restarting many times, Llama-3-scaled frequencies.
    g = torch.Generator().manual_seed(1)
    shape = (1, 160, 14, 2, 64)
    q, k = _qk(shape, dtype, g)
    pos = _packed_positions(160, g)
    assert (pos == 0).sum() >= 5
    _check(q, k, pos, _llama3_inv_freq(64), g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_large_positions_use_fp32_angles(dtype):
    # Positions up to 30000: an angle computed any other way than the reference's fp32 product (e.g. in
    # fp64, or rounded through the activation dtype) is off by up to ~30000 * 2^-24 rad and fails here.
    g = torch.Generator().manual_seed(2)
    shape = (2, 48, 6, 2, 64)
    q, k = _qk(shape, dtype, g)
    pos = torch.randint(20000, 30001, (2, 48), generator=g).to(DEVICE)
    inv_freq = _inv_freq(64, theta=10000.0)
    got_q, *_ = _check(q, k, pos, inv_freq, g)
    if dtype == torch.float32:
        # fp64 angles and fp64 cos/sin: the kernel must be far closer to the fp32-angle result.
        ang = pos[..., None].double() * inv_freq.double()
        cos, sin = torch.cat((ang, ang), -1).cos()[:, :, None], torch.cat((ang, ang), -1).sin()[:, :, None]
        x = q.double()
        fp64_angles = x * cos + torch.cat((-x[..., 32:], x[..., :32]), -1) * sin
        fp32_angles, _ = rope_ref(q.double(), k.double(), pos, inv_freq)
        err32 = (got_q.double() - fp32_angles).abs().max().item()
        err64 = (got_q.double() - fp64_angles).abs().max().item()
        assert err32 < 1e-5 < err64, (err32, err64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rope_rounds_once_to_nearest(dtype):
    # Stricter than the ratio test: every fp16/bf16 output is within half an ulp of the exact rotation,
    # plus 1e-6 for the fp32 arithmetic before the rounding (inputs are O(1), so its error is ~1e-7
    # whatever the output's size). Catches a truncating fp32 -> bf16 conversion, which Triton's
    # interpreter does unless the kernel rounds by hand.
    g = torch.Generator().manual_seed(8)
    shape = (2, 32, 14, 2, 64)
    q, k = _qk(shape, dtype, g)
    pos = torch.randint(0, 4096, (2, 32), generator=g).to(DEVICE)
    inv_freq = _inv_freq(64)
    got = rope(q.clone(), k.clone(), pos, inv_freq)
    exact = rope_ref(q.double(), k.double(), pos, inv_freq)
    for a, e in zip(got, exact, strict=True):
        # ulp of |e| in [2^m, 2^(m+1)) is eps * 2^m; fp16 subnormals have a fixed 2^-24.
        ulp = torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(e), torch.frexp(e).exponent - 1)
        ulp = ulp.clamp_min(2.0**-24)
        excess = (a.double() - e).abs() - (0.5 * ulp + 1e-6)
        assert excess.max().item() <= 0, f"{excess.max().item():.3e} above half an ulp"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_propagates_nan(dtype):
    # A NaN in q (or in the incoming gradient) makes its rotated pair NaN and nothing else.
    q = torch.ones(1, 2, 2, 8, dtype=dtype, device=DEVICE)
    k = torch.ones(1, 2, 1, 8, dtype=dtype, device=DEVICE)
    q[0, 1, 0, 1] = float("nan")
    pos, inv_freq = torch.tensor([[0, 5]], device=DEVICE), _inv_freq(8)
    out_q, out_k = rope(q.clone(), k.clone(), pos, inv_freq)
    assert out_q[0, 1, 0, [1, 5]].isnan().all() and out_q.isnan().sum() == 2 and not out_k.isnan().any()
    leaf = torch.ones(1, 2, 2, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(rope(leaf.clone(), k.clone(), pos, inv_freq)[0], leaf, q)
    assert grad[0, 1, 0, [1, 5]].isnan().all() and grad.isnan().sum() == 2


def test_rope_broadcast_positions_and_strided_inputs():
    # position_ids [1, T] for a batch of 2; q and k as non-contiguous views (a transposed [B, n, T, hd]
    # buffer), rotated in place through their strides without autograd.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 7, 10, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 2, 7, 10, generator=g).to(DEVICE).transpose(1, 2)
    pos = torch.randint(0, 100, (1, 7), generator=g).to(DEVICE)
    inv_freq = _inv_freq(10)
    ref_q, ref_k = rope_ref(q, k, pos, inv_freq)
    ptr_q, ptr_k = q.data_ptr(), k.data_ptr()
    out_q, out_k = rope(q, k, pos, inv_freq)
    assert out_q.data_ptr() == ptr_q and out_k.data_ptr() == ptr_k
    torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)


def test_rope_in_place_contract():
    g = torch.Generator().manual_seed(4)
    q, k = _qk((2, 5, 6, 2, 10), torch.bfloat16, g)
    pos = torch.randint(0, 50, (2, 5), generator=g).to(DEVICE)
    inv_freq = _inv_freq(10)
    out_q, out_k = rope(q, k, pos, inv_freq)
    # The same storage, and the inputs themselves now hold the rotation.
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert torch.equal(out_q, q) and torch.equal(out_k, k)
    assert q._version > 0 and k._version > 0  # autograd's in-place checks see the change


def test_rope_empty():
    q = torch.randn(2, 0, 6, 10, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 0, 2, 10, device=DEVICE, requires_grad=True)
    pos = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    out_q, out_k = rope(q.clone(), k.clone(), pos, _inv_freq(10))
    assert out_q.shape == q.shape and out_k.shape == k.shape
    (out_q.sum() + out_k.sum()).backward()
    assert q.grad.shape == q.shape


def test_rope_gradient_through_linear_projections():
    # The model's path: x -> nn.Linear -> .view(B, T, n, hd) -> rope -> loss. Rotating the projection
    # outputs in place is safe because the projections' backward needs x and the weight, not the output.
    torch.manual_seed(5)
    q_proj, k_proj = torch.nn.Linear(24, 6 * 10).to(DEVICE), torch.nn.Linear(24, 2 * 10).to(DEVICE)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    pos = torch.randint(0, 100, (2, 7), device=DEVICE)
    inv_freq = _inv_freq(10)
    params = [x, q_proj.weight, q_proj.bias, k_proj.weight, k_proj.bias]

    def loss(fn):
        q = q_proj(x).view(2, 7, 6, 10)
        k = k_proj(x).view(2, 7, 2, 10)
        out_q, out_k = fn(q, k, pos, inv_freq)
        if fn is rope:  # in place: the returned tensors are q's and k's memory, q and k hold them too
            assert out_q.data_ptr() == q.data_ptr() and torch.equal(out_q, q)
        # Nonlinear in the outputs, and q meets k, so a wrong sign or a swapped half shows in every grad.
        return (out_q.pow(2).sum(-1) * out_k.sum(-1).repeat_interleave(3, dim=2)).sum() + out_k.pow(3).sum()

    got = torch.autograd.grad(loss(rope), params)
    want = torch.autograd.grad(loss(rope_ref), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_fused_qkv_slice_is_copied_under_autograd():
    # Slices of one fused projection are views that are not reshapes of their base: under autograd the
    # op rotates a copy (documented), leaves the projection output alone, and the gradients are right.
    torch.manual_seed(6)
    qkv_proj = torch.nn.Linear(24, (6 + 2 + 2) * 10).to(DEVICE)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    pos = torch.randint(0, 100, (2, 7), device=DEVICE)
    inv_freq = _inv_freq(10)

    def loss(fn):
        qkv = qkv_proj(x)
        before = qkv.detach().clone()
        q, k = qkv[..., :60].view(2, 7, 6, 10), qkv[..., 60:80].view(2, 7, 2, 10)
        out_q, out_k = fn(q, k, pos, inv_freq)
        assert torch.equal(qkv, before)
        return (out_q.pow(2).sum() + (out_k * out_k.flip(-1)).sum()) * qkv[..., 80:].sum()

    got = torch.autograd.grad(loss(rope), [x, qkv_proj.weight])
    want = torch.autograd.grad(loss(rope_ref), [x, qkv_proj.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_raises_when_a_saved_tensor_is_overwritten():
    # tanh saves its output for backward; rotating that output in place must be caught by autograd
    # (through mark_dirty's version bump), not silently give wrong gradients.
    x = torch.randn(2, 5, 20, device=DEVICE, requires_grad=True)
    q = torch.tanh(x).view(2, 5, 2, 10)
    k = torch.randn(2, 5, 1, 10, device=DEVICE, requires_grad=True).clone()
    out_q, out_k = rope(q, k, torch.randint(0, 9, (2, 5), device=DEVICE), _inv_freq(10))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out_q.sum() + out_k.sum()).backward()


def test_rope_backward_leaves_incoming_gradients_alone():
    # The same gradient tensor can reach several consumers (here: the caller's own), so backward writes
    # new tensors instead of rotating dq/dk over the incoming ones.
    g = torch.Generator().manual_seed(7)
    q, k = _qk((2, 5, 6, 2, 10), torch.float32, g)
    pos = torch.randint(0, 50, (2, 5), generator=g).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, k)]
    outs = rope(*(t.clone() for t in leaves), pos, _inv_freq(10))
    grads = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outs]
    kept = [t.clone() for t in grads]
    torch.autograd.backward(outs, grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, kept, strict=True))
    assert q.grad is not None and k.grad is not None


def test_rope_argument_errors():
    q, k = torch.randn(2, 5, 6, 10, device=DEVICE), torch.randn(2, 5, 2, 10, device=DEVICE)
    pos, inv_freq = torch.zeros(2, 5, dtype=torch.long, device=DEVICE), _inv_freq(10)
    with pytest.raises(ValueError, match="inv_freq"):
        rope(q, k, pos, _inv_freq(8))
    with pytest.raises(ValueError, match="fp32"):
        rope(q, k, pos, inv_freq.double())
    with pytest.raises(ValueError, match="position_ids"):
        rope(q, k, torch.zeros(3, 5, dtype=torch.long, device=DEVICE), inv_freq)
    with pytest.raises(ValueError, match="dtype"):
        rope(q, k.half(), pos, inv_freq)
    with pytest.raises(ValueError, match="same memory"):
        rope(q, q, pos, inv_freq)


def test_rope_needs_triton_device(monkeypatch):
    # Plain CPU tensors without the interpreter: check_triton's error, before anything is launched.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        rope(q, k, torch.zeros(1, 3, dtype=torch.long), _inv_freq(4).cpu())


def test_rope_after_a_function_that_returns_a_view_of_its_own_buffer():
    # A custom autograd Function may return a view of an internal buffer (no history): dirtying that base
    # would cut the graph. rope must route through the view instead (here by copying it).
    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return (x * 2).reshape(1, 3, 2, 8)

        @staticmethod
        def backward(ctx, g):
            return g.reshape(1, 3, 16) * 2

    x = torch.randn(1, 3, 16, device=DEVICE, requires_grad=True)
    q = Doubled.apply(x)
    assert q._base is not None and not q._base.requires_grad
    k = torch.randn(1, 3, 1, 8, device=DEVICE)
    out_q, _ = rope(q, k, torch.arange(3, device=DEVICE)[None], _inv_freq(8))
    out_q.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_ref_is_the_models_rope_bit_for_bit(dtype):
    # ops/ sit below the model, so rope_ref writes the model's math out again: the two must not drift.
    from fasttune.models.model import apply_rope, rope_cos_sin

    cfg = ModelConfig("qwen2", 32, 64, 96, 1, 4, 2, 16)
    inv_freq = rope_inv_freq(cfg)
    q = torch.randn(2, 9, 4, 16, dtype=dtype)
    k = torch.randn(2, 9, 2, 16, dtype=dtype)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [5, 6, 7, 8, 9, 10, 11, 12, 4000]])
    cos, sin = rope_cos_sin(inv_freq, pos, dtype)
    q_ref, k_ref = rope_ref(q, k, pos, inv_freq)
    assert torch.equal(q_ref, apply_rope(q, cos, sin)) and torch.equal(k_ref, apply_rope(k, cos, sin))
