"""Fused linear + cross-entropy against fp64, as error ratios to PyTorch in the same dtype; its memory
(never [N, V]), no host synchronisation, ignore_index, and a tied head through a real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fasttune.ops.linear_cross_entropy import (
    _auto_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from helpers import assert_fp64_close, hf_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QWEN_V, QWEN_H = 151_936, 896

# (N, H, V, chunk sizes): each shape with a chunk that divides N and one that does not (the op then runs
# ceil(N / chunk) chunks of near-equal sizes; None: automatic, one chunk at these N). Small odd;
# non-power-of-two; Qwen2.5-0.5B's real vocabulary with a small hidden size (38 blocks of 4,096 per row,
# the last one partial); Qwen2.5's hidden size with a cut vocabulary.
# At V = 151,936 the chunks are multiples of 4 rows (4 x 4, and 2 x 8 for chunk 12): the CPU's MKL sgemm
# sums the rows outside its 4-row micro-kernel sequentially over K, and grad_hidden's K is V, so an fp32
# chunk of 5 or 6 rows has a GEMM error of 1.1e-4 where the same rows in a chunk of 4 or 8 have 1.5e-6
# (measured on these inputs): a property of that BLAS, not of the op, and 4x eager's error.
CASES = {
    "small": (7, 12, 50, [3, None]),
    "n37_v1001": (37, 60, 1001, [1, 8]),
    "qwen_vocab": (16, 32, QWEN_V, [4, 12]),
    "qwen_hidden": (64, 896, 4096, [16, 24]),
}


def _inputs(N, H, V, dtype, seed=0, ignore_frac=0.2, lead=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, N, H, generator=g).to(dtype)
    # Logits with a standard deviation of ~3, as a trained LM head gives (peaked softmax, long tail).
    weight = (3 * H**-0.5 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (*lead, N), generator=g)
    targets[torch.rand(targets.shape, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, scale=True, **kw):
    """Loss and (grad_hidden, grad_weight) of loss / n_targets, the mean the model trains on, so that the
    backward's scaling by grad_output != 1 is part of what is checked."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, n = fn(h, w, targets, **kw)
    out = loss / n.clamp(min=1) if scale else loss
    gh, gw = torch.autograd.grad(out, (h, w))
    return loss.detach(), n, gh, gw


def _check_against_fp64(hidden, weight, targets, **kw):
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, **kw)
    same = _loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets)
    exact = _loss_and_grads(linear_cross_entropy_ref, hidden.double(), weight.double(), targets)
    assert got[1].dtype == torch.int64 and got[1].dim() == 0 and torch.equal(got[1], same[1])
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, i in (("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)):
        assert_fp64_close(name, got[i], same[i], exact[i])
    assert got[2].dtype == hidden.dtype and got[3].dtype == weight.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,H,V,chunk",
    [(N, H, V, c) for N, H, V, cs in CASES.values() for c in cs],
    ids=[f"{k}-c{c}" for k, (*_, cs) in CASES.items() for c in cs],
)
def test_linear_cross_entropy(dtype, N, H, V, chunk):
    _check_against_fp64(*_inputs(N, H, V, dtype), chunk_size=chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_row(dtype):
    """A packed [1, T, H] row of five sequences: -100 at each sequence's last token (its target lies in the
    next sequence) and on the prompts; the op flattens [B, T] itself. Chunks of 40 cut through sequences."""
    hidden, weight, targets = _inputs(96, 60, 1001, dtype, seed=3, ignore_frac=0.0, lead=(1,))
    cu_seqlens = [0, 9, 30, 31, 70, 96]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        targets[0, start : start + (end - start) // 3] = -100  # the prompt
        targets[0, end - 1] = -100
    _check_against_fp64(hidden, weight, targets, chunk_size=40)


def test_ignored_rows_and_custom_ignore_index():
    """Rows whose target is ignore_index add exactly 0: the loss is that of the other rows alone, their
    grad_hidden rows are 0, and the weight gradient is the other rows'."""
    hidden, weight, targets = _inputs(37, 60, 1001, torch.float32, seed=4, ignore_frac=0.0)
    targets[::3] = 7  # ignore_index 7 here, and some real targets elsewhere are not 7
    keep = targets != 7
    loss, n, gh, gw = _loss_and_grads(
        linear_cross_entropy, hidden, weight, targets, scale=False, ignore_index=7, chunk_size=8
    )
    loss_k, n_k, gh_k, gw_k = _loss_and_grads(
        linear_cross_entropy, hidden[keep], weight, targets[keep], scale=False, ignore_index=7, chunk_size=8
    )
    assert n == n_k == keep.sum()
    torch.testing.assert_close(loss, loss_k)
    assert torch.equal(gh[~keep], torch.zeros_like(gh[~keep]))
    torch.testing.assert_close(gh[keep], gh_k)
    torch.testing.assert_close(gw, gw_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored(dtype):
    """No target at all: loss 0, n_targets 0, zero gradients, no NaN (the model divides by n_targets)."""
    hidden, weight, targets = _inputs(9, 12, 50, dtype)
    targets[:] = -100
    loss, n, gh, gw = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    assert loss.item() == 0.0 and n.item() == 0 and n.dtype == torch.int64
    assert not gh.any() and not gw.any()


def test_target_out_of_range_gives_nan():
    """A target outside [0, V) that is not ignore_index cannot be checked without a host sync: the loss
    turns NaN (for the training loop's non-finite guard) and nothing outside the row is read."""
    hidden, weight, targets = _inputs(9, 12, 50, torch.float32)
    targets[2] = 50
    loss, n = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert torch.isnan(loss)


def test_frozen_weight_keeps_no_weight_gradient():
    """A frozen head (LoRA fine-tuning) gets no [V, H] gradient buffer at all, and grad_hidden is the
    same as with a trainable head."""
    H, V = 12, 1001
    hidden, weight, targets = _inputs(37, H, V, torch.float32, seed=9)
    h = hidden.clone().requires_grad_()
    with _Recorder() as rec:
        loss, _ = linear_cross_entropy(h, weight, targets, chunk_size=8)
        (gh,) = torch.autograd.grad(loss, h)
    assert not [shape for _, shape, _ in rec.outputs if shape == (V, H)]
    torch.testing.assert_close(
        gh,
        _loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale=False, chunk_size=8)[2],
        rtol=0,
        atol=0,
    )


def test_no_grad_and_retain_graph():
    """Under no_grad only the loss is computed (no gradient pass); a retained graph gives the same
    gradients twice (the backward scales the stored gradients out of place)."""
    hidden, weight, targets = _inputs(37, 60, 1001, torch.float32, seed=5)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        loss_ng, _ = linear_cross_entropy(h, w, targets, chunk_size=8)
    loss, _ = linear_cross_entropy(h, w, targets, chunk_size=8)
    assert torch.equal(loss_ng, loss.detach())
    first = torch.autograd.grad(loss * 0.5, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss * 0.5, (h, w))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_autocast_and_mixed_dtypes():
    """Under autocast the logits are computed in autocast's dtype, as lm_head would compute them; a bf16
    hidden with an fp32 weight outside autocast casts the weight to bf16. Either way each gradient comes
    back in its input's own dtype (the weight's accumulated in fp32), checked against fp64 at the
    bf16-rounded inputs (the point autocast evaluates)."""
    hidden, weight, targets = _inputs(37, 60, 1001, torch.float32, seed=6)
    exact = _loss_and_grads(
        linear_cross_entropy_ref, hidden.bfloat16().double(), weight.bfloat16().double(), targets
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
        same = _loss_and_grads(linear_cross_entropy_ref, hidden, weight, targets)
    for name, i in (("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)):
        assert got[i].dtype == torch.float32
        assert_fp64_close(name, got[i], same[i], exact[i])

    mixed = _loss_and_grads(linear_cross_entropy, hidden.bfloat16(), weight, targets, chunk_size=8)
    assert mixed[2].dtype == torch.bfloat16 and mixed[3].dtype == torch.float32
    torch.testing.assert_close(mixed[0], got[0])
    torch.testing.assert_close(mixed[3], got[3])


def test_tied_head_through_real_model():
    """Qwen2-style tied head: the op's weight gradient lands in the embedding's Parameter on top of the
    embedding lookup's own gradient. Loss and every parameter's gradient through the op match the logits
    path (lm_head + F.cross_entropy) against an fp64 copy of the model."""
    from fasttune import CausalLM, ModelConfig

    hf = hf_model("qwen2_tied")

    def load(dtype):
        model = CausalLM(ModelConfig.from_hf(hf.config.to_dict()))
        missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        return model.to(dtype)

    g = torch.Generator().manual_seed(7)
    V = hf.config.vocab_size
    ids = torch.randint(0, V, (2, 24), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100

    def run(model, fused):
        model.zero_grad(set_to_none=True)
        hidden = model(ids)
        if fused:
            loss, n = linear_cross_entropy(hidden, model.lm_head.weight, targets, chunk_size=10)
        else:
            logits = model.lm_head(hidden).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            n = (targets != -100).sum()
        (loss / n).backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    model = load(torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got, same, exact = run(model, True), run(load(torch.float32), False), run(load(torch.float64), False)
    assert_fp64_close("loss", got[0], same[0], exact[0])
    assert got[1].keys() == exact[1].keys() and "model.embed_tokens.weight" in got[1]
    for name, grad in got[1].items():
        assert_fp64_close(name, grad, same[1][name], exact[1][name])
    # The head's share alone would miss the embedding lookup's rows: the sum is what matched above.
    emb_rows = torch.zeros(V, dtype=torch.bool)
    emb_rows[ids.flatten()] = True
    assert got[1]["model.embed_tokens.weight"][emb_rows].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Memory and synchronisation, seen through the aten ops that run


class _Recorder(TorchDispatchMode):
    """Records every aten op's name and the shapes and sizes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.outputs: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
        return out


def _record(fn, N, H, V, chunk=None):
    hidden, weight, targets = _inputs(N, H, V, torch.float32, seed=8)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    kw = {} if chunk is None else {"chunk_size": chunk}
    with _Recorder() as rec:
        loss, n = fn(h, w, targets, **kw)
        (loss / n).backward()
    return rec


def _largest_logits_like(rec, H, V):
    """Bytes of the largest output with V in its shape, other than the [V, H] gradient buffers."""
    return max(b for _, shape, b in rec.outputs if V in shape and shape != (V, H))


def test_memory_grows_with_chunk_not_tokens():
    """The largest tensor any aten op returns in forward + backward is one chunk of logits (or a [V, H] /
    [N, H] gradient buffer), never [N, V]; doubling N at a fixed chunk leaves the largest logits-shaped
    tensor unchanged. The eager reference, recorded the same way, does allocate [N, V] (the instrument
    sees allocations)."""
    H, V, C = 12, 1001, 16
    ref = _record(linear_cross_entropy_ref, 128, H, V)
    assert max(b for *_, b in ref.outputs) >= 128 * V * 4
    sizes = {}
    for N in (128, 256):
        rec = _record(linear_cross_entropy, N, H, V, chunk=C)
        largest = max(b for *_, b in rec.outputs)
        assert largest <= max(C * V, V * H, N * H) * 4, (N, largest)
        assert largest * 8 <= N * V * 4, (N, largest)
        assert not any(shape[:1] == (N,) and V in shape for _, shape, _ in rec.outputs)
        sizes[N] = _largest_logits_like(rec, H, V)
    assert sizes[128] == sizes[256] == C * V * 4, sizes


def test_auto_chunk_size():
    """The automatic chunk keeps a logits chunk under 512 MiB at Qwen2.5's vocabulary, in whole 256-token
    tiles, and never exceeds N."""
    assert _auto_chunk_size(16384, QWEN_V, 2) == 1536  # 445 MiB of bf16 logits
    assert _auto_chunk_size(16384, QWEN_V, 4) == 768  # 445 MiB of fp32 logits
    assert _auto_chunk_size(100, QWEN_V, 2) == 100
    assert _auto_chunk_size(16384, 32_000, 2) == 8192
    for v, b in ((QWEN_V, 2), (QWEN_V, 4), (128_256, 2), (32_000, 4)):
        assert _auto_chunk_size(1 << 20, v, b) * v * b <= 512 * 2**20


def test_no_host_sync():
    """No aten op that reads a tensor's value on the host (.item(), nonzero, equal) runs in the op's
    forward or backward."""
    syncing = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero")
    with _Recorder() as control:
        torch.ones(2).sum().item()
    assert [op for op in control.ops if op.startswith(syncing)]  # the instrument sees .item()
    rec = _record(linear_cross_entropy, 37, 60, 1001, chunk=8)
    assert rec.ops and not [op for op in rec.ops if op.startswith(syncing)]


def test_errors(monkeypatch):
    hidden, weight, targets = _inputs(7, 12, 50, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        linear_cross_entropy(hidden.double(), weight, targets)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA"):
        linear_cross_entropy(hidden, weight, targets)
