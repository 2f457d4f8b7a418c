"""fasttune.ops.lora_linear: the fused LoRA linear against fp64, against PyTorch in the same dtype, and
against `fasttune.models.lora.LoraLinear`, forward and backward, with and without bias and dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fasttune.models.lora import LoraLinear
from fasttune.ops import interpreting
from fasttune.ops.lora_linear import (
    LoraLinearFunction,
    _keep_scale,
    lora_dropout_mask,
    lora_linear,
    lora_linear_ref,
)
from helpers import assert_fp64_close, dot_dtype_skip

# Where the kernels run: the CPU under Triton's interpreter (set by conftest where there is no GPU), else
# CUDA. On a GPU machine the same tests then run on the GPU, bf16 included.
DEVICE = "cpu" if interpreting() else "cuda"
ALPHA = 32.0  # s = alpha / r: 8, 4 and 2 at these ranks, so the adapter term is not lost in the base term

# (x's leading dims, in, out, r). Leading dims multiply to the token count N.
SHAPES = {
    "odd": ((7,), 12, 10, 4),
    "npot": ((3, 11), 60, 44, 8),
    "qwen05b_q_proj": ((2, 8), 896, 896, 16),  # Qwen2.5-0.5B's hidden size, 16 tokens
    "qwen05b_k_proj": ((16,), 896, 128, 16),  # its k_proj: 2 KV heads x 64
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(shape, dtype, bias: bool, device, seed=0):
    lead, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(device)

    x = randn(*lead, d_in).to(dtype)
    weight = randn(d_out, d_in, scale=d_in**-0.5).to(dtype)
    b = randn(d_out).to(dtype) if bias else None
    A = randn(r, d_in, scale=d_in**-0.5).float()
    B = randn(d_out, r, scale=0.5 * r**-0.5).float()
    dy = randn(*lead, d_out).to(dtype)
    return x, weight, b, A, B, dy


def _exact(x, weight, b, A, B, scaling, mask, p, dy):
    """y, dx, dA, dB in fp64 from the same (rounded) inputs; the kept scale is the fp32 1 / (1 - p) that
    both PyTorch's dropout and the op multiply by."""
    x64 = x.double().requires_grad_()
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    xd = x64 if mask is None else x64 * mask.double() * _keep_scale(p)
    y = x64 @ weight.double().t() + scaling * (xd @ A64.t()) @ B64.t()
    if b is not None:
        y = y + b.double()
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


def _run(fn, x, A, B, dy):
    """fn(x, A, B) on fresh leaves, backward with dy: (y, dx, dA, dB)."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = fn(x, A, B)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


def _check(shape, dtype, bias, p, device):
    x, weight, b, A, B, dy = _inputs(shape, dtype, bias, device)
    scaling = ALPHA / shape[3]
    seed = 1234
    # The op draws its mask from `generator`; the same seed redraws it for the reference.
    mask = lora_dropout_mask(x.shape, p, device, torch.Generator(device).manual_seed(seed)) if p else None
    got = _run(
        lambda x, A, B: lora_linear(
            x,
            weight,
            b,
            A,
            B,
            scaling,
            dropout_p=p,
            training=True,
            generator=torch.Generator(device).manual_seed(seed),
        ),
        x,
        A,
        B,
        dy,
    )
    ref = _run(lambda x, A, B: lora_linear_ref(x, weight, b, A, B, scaling, mask, p), x, A, B, dy)
    exact = _exact(x, weight, b, A, B, scaling, mask, p, dy)
    for name, g, r, e in zip(("y", "dx", "dA", "dB"), got, ref, exact, strict=True):
        assert_fp64_close(name, g, r, e)
    assert weight.grad is None and (b is None or b.grad is None)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_against_fp64(shape, dtype, bias, p):
    reason = dot_dtype_skip(dtype, DEVICE)
    if reason:
        pytest.skip(reason)
    _check(shape, dtype, bias, p, DEVICE)


GPU_SHAPES = {
    "qwen05b_gate_proj": ((4, 512), 896, 4864, 16),
    "qwen05b_down_proj": ((1000,), 4864, 896, 16),
    "npot": ((3, 333), 200, 136, 8),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_gpu_against_fp64(shape, dtype):
    """Full-width shapes and bf16 (which the interpreter cannot check) on the GPU, bias and dropout on."""
    _check(shape, dtype, True, 0.1, "cuda")


class _FixedDropout(nn.Module):
    """nn.Dropout's arithmetic (x * mask / (1 - p), the scale divided in fp32) for a given draw."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.float().div_(1 - self.p)


def _lora_module(shape, dtype, bias, p, device):
    lead, d_in, d_out, r = shape
    torch.manual_seed(3)
    base = nn.Linear(d_in, d_out, bias=bias).to(device=device, dtype=dtype)
    module = LoraLinear(base, r, ALPHA, dropout=p)
    with torch.no_grad():
        module.lora_B.weight.normal_(0, 0.5 * r**-0.5)  # B starts at zero: make the adapter count
    x = torch.randn(*lead, d_in, device=device).to(dtype)
    dy = torch.randn(*lead, d_out, device=device).to(dtype)
    return module.train(), x, dy


def _module_run(module, fn, x, dy):
    for p in (module.lora_A.weight, module.lora_B.weight):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad, module.lora_A.weight.grad, module.lora_B.weight.grad


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [SHAPES["npot"], SHAPES["qwen05b_k_proj"]], ids=["npot", "k_proj"])
def test_matches_lora_module(shape, dtype, p):
    """The op on a `LoraLinear`'s own parameters: the reference is that module's math exactly, and the op
    is as close to fp64 as the module is (same dropout draw for both)."""
    module, x, dy = _lora_module(shape, dtype, True, p, DEVICE)
    seed = 99
    if p:
        mask = lora_dropout_mask(x.shape, p, DEVICE, torch.Generator(DEVICE).manual_seed(seed))
        module.lora_dropout = _FixedDropout(mask, p)
    else:
        mask = None
    W, b = module.base_layer.weight, module.base_layer.bias
    A, B = module.lora_A.weight, module.lora_B.weight
    mod = _module_run(module, module, x, dy)
    ref = _module_run(module, lambda x: lora_linear_ref(x, W, b, A, B, module.scaling, mask, p), x, dy)
    gen = torch.Generator(DEVICE).manual_seed(seed)
    got = _module_run(module, lambda x: lora_linear(x, W, b, A, B, module.scaling, p, True, gen), x, dy)
    exact = _exact(x, W.detach(), b.detach(), A.detach(), B.detach(), module.scaling, mask, p, dy)
    for name, m, r, g, e in zip(("y", "dx", "dA", "dB"), mod, ref, got, exact, strict=True):
        assert torch.equal(r, m), f"{name}: lora_linear_ref is not LoraLinear's math"
        assert_fp64_close(name, g, m, e)
    assert W.grad is None and b.grad is None


@pytest.mark.skipif(DEVICE != "cpu", reason="nn.Dropout draws with bernoulli_ on the CPU only (CUDA: fused)")
def test_dropout_draw_is_nn_dropouts():
    """With the global RNG in the same state, training-mode dropout drops the inputs LoraLinear drops."""
    module, x, dy = _lora_module(SHAPES["npot"], torch.float32, True, 0.25, DEVICE)
    W, b, A, B = module.base_layer.weight, module.base_layer.bias, module.lora_A.weight, module.lora_B.weight
    torch.manual_seed(5)
    y_mod = module(x)
    torch.manual_seed(5)
    y_op = lora_linear(x, W, b, A, B, module.scaling, 0.25, training=True)
    torch.testing.assert_close(y_op, y_mod, rtol=1e-5, atol=1e-5)
    no_drop = lora_linear(x, W, b, A, B, module.scaling, 0.0)
    assert (y_op - no_drop).abs().max() > 1e-2  # the draw did drop something


def test_dropout_only_in_training():
    x, weight, b, A, B, _ = _inputs(SHAPES["npot"], torch.float32, True, DEVICE)
    plain = lora_linear(x, weight, b, A, B, 2.0)
    assert torch.equal(lora_linear(x, weight, b, A, B, 2.0, dropout_p=0.5, training=False), plain)
    gen = torch.Generator(DEVICE)
    y1 = lora_linear(x, weight, b, A, B, 2.0, dropout_p=0.5, training=True, generator=gen.manual_seed(1))
    y2 = lora_linear(x, weight, b, A, B, 2.0, dropout_p=0.5, training=True, generator=gen.manual_seed(1))
    assert torch.equal(y1, y2) and not torch.equal(y1, plain)
    keep = lora_dropout_mask((1000, 100), 0.3, DEVICE, gen.manual_seed(2))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.01


def test_frozen_base_gets_no_gradient():
    """Even through the raw autograd function with a weight that requires grad, W and b get nothing; the
    public op refuses such a weight rather than leave it silently untrained."""
    x, weight, b, A, B, dy = _inputs(SHAPES["odd"], torch.float32, True, DEVICE)
    weight.requires_grad_()
    b.requires_grad_()
    A.requires_grad_()
    LoraLinearFunction.apply(x, weight, b, A, B, 2.0, None, 0.0).backward(dy)
    assert weight.grad is None and b.grad is None and A.grad is not None
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight, b, A, B, 2.0)
    with torch.no_grad():  # inference: nothing to train, so nothing to refuse
        lora_linear(x, weight, b, A, B, 2.0)


class _MaterialisationWatch(TorchDispatchMode):
    """Records every aten op that outputs a new tensor (not a view of the weight) of the weight's shape,
    either way round."""

    def __init__(self, weight):
        super().__init__()
        self.shapes = {tuple(weight.shape), tuple(weight.shape)[::-1]}
        self.storage = weight.untyped_storage().data_ptr()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and tuple(t.shape) in self.shapes
                and t.untyped_storage().data_ptr() != self.storage
            ):
                self.hits.append(str(func))
        return out


def test_never_materialises_the_merged_weight():
    # N 33, in 60, out 44, r 8: no activation or adapter shape equals [44, 60] or [60, 44].
    x, weight, b, A, B, dy = _inputs(SHAPES["npot"], torch.float32, True, DEVICE)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with _MaterialisationWatch(weight) as watch:
        lora_linear(x, weight, b, A, B, 4.0, dropout_p=0.25, training=True).backward(dy)
    assert watch.hits == []
    assert A.grad is not None and x.grad is not None
    with _MaterialisationWatch(weight) as control:  # the watch does see a merge
        _ = weight + 4.0 * (B @ A)
    assert control.hits


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=lambda t: t[..., :-1]), "do not chain"),
        (dict(A=lambda t: t.double()), "fp32"),
        (dict(x=lambda t: t.double()), "share a dtype"),
        (dict(b=lambda t: t[:-1]), "bias"),
    ],
    ids=["shape", "adapter-dtype", "base-dtype", "bias-shape"],
)
def test_bad_inputs(change, match):
    x, weight, b, A, B, _ = _inputs(SHAPES["odd"], torch.float32, True, DEVICE)
    args = dict(x=x, weight=weight, bias=b, A=A, B=B)
    args = {k: change.get("b" if k == "bias" else k, lambda t: t)(v) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        lora_linear(args["x"], args["weight"], args["bias"], args["A"], args["B"], 2.0)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, b, A, B, _ = _inputs(SHAPES["odd"], torch.float32, True, "cpu")
    with pytest.raises(RuntimeError, match="lora_linear: Triton kernels need CUDA"):
        lora_linear(x, weight, b, A, B, 2.0)


def test_strided_inputs_and_gradients():
    """Views straight from a model (a sliced x, a transposed weight) and autograd's expanded dy of a sum:
    the kernels read strides rather than assume contiguity."""
    x, weight, b, A, B, _ = _inputs(SHAPES["npot"], torch.float32, True, DEVICE)
    x_wide = torch.stack([x, -x], dim=-1).flatten(-2)  # x is every other column of x_wide
    w_t = weight.t().contiguous().t()  # same values, column-major
    one = torch.tensor(1.0, device=DEVICE)
    got = _run(lambda xw, A, B: lora_linear(xw[..., ::2], w_t, b, A, B, 4.0).sum(), x_wide, A, B, one)
    ref = _run(lambda xw, A, B: lora_linear_ref(xw[..., ::2], weight, b, A, B, 4.0).sum(), x_wide, A, B, one)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=name)


def test_no_tokens():
    x, weight, b, A, B, _ = _inputs(SHAPES["odd"], torch.float32, True, DEVICE)
    x0 = x[:0].requires_grad_()
    A.requires_grad_()
    y = lora_linear(x0, weight, b, A, B, 2.0)
    assert y.shape == (0, weight.shape[0])
    y.sum().backward()
    assert x0.grad.shape == x0.shape and torch.equal(A.grad, torch.zeros_like(A))


def test_under_autocast_it_is_the_op_on_cast_inputs():
    """Inside torch.autocast (the loop's precision=bf16) the op is what it is on inputs cast as nn.Linear
    casts them: x, W and b in the autocast dtype, the adapters fp32; the backward, also run under
    autocast, re-casts nothing (it once failed there: fp32 adapters against a re-cast bf16 operand).
    fp16 autocast on the CPU: the interpreter's bf16 tl.dot is wrong (TOOLCHAIN.md)."""
    module, x, dy = _lora_module(SHAPES["npot"], torch.float32, True, 0.0, DEVICE)
    W, b = module.base_layer.weight, module.base_layer.bias
    A, B = module.lora_A.weight, module.lora_B.weight
    h = torch.float16

    def run(autocast: bool):
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=h, enabled=autocast):
            y = lora_linear(
                xi if autocast else xi.to(h),
                W if autocast else W.to(h),
                b if autocast else b.to(h),
                A,
                B,
                module.scaling,
            )
            y.backward(dy.to(h))
        out = (y.detach(), xi.grad.clone(), A.grad.clone(), B.grad.clone())
        A.grad = B.grad = None
        return out

    under, cast = run(True), run(False)
    assert under[0].dtype == h
    for name, u, c in zip(("y", "dx", "dA", "dB"), under, cast, strict=True):
        assert torch.equal(u, c), name
