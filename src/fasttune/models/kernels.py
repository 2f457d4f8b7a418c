"""The fused Triton ops, applied to a model from outside: `apply_kernels(model, "triton")`.

models/model.py is the PyTorch math and nothing else. Each module there whose work a fused kernel can do
has a twin here, a subclass with the same parameters and buffers (so checkpoints, FSDP and LoRA see the same
module) whose forward calls the kernel instead:

    RMSNorm  -> FusedRMSNorm    ops/rms_norm.py (with the decoder layer's residual add fused in)
    Attention -> FusedAttention  ops/rope.py, in place, the angles computed in the kernel
    Decoder  -> FusedDecoder    hands the layers (position_ids, inv_freq) instead of cos/sin tables
    MLP      -> FusedMLP        ops/swiglu.py
    LossHead -> FusedLossHead   ops/linear_cross_entropy.py: head + cross-entropy, chunked

`apply_kernels` swaps each module's class (`module.__class__`) to its twin or back, the way
train/parallelize.py applies compile and FSDP: nothing in the model asks which ops it runs. LoRA layers
(lora.py, qlora.py) carry the choice in their `kernels` attribute, set here too. Apply before FSDP's
`fully_shard`, which gives the modules it wraps classes of its own.
"""

from __future__ import annotations

import logging

import torch

from fasttune.models.model import MLP, Attention, Decoder, LossHead, RMSNorm
from fasttune.ops import choose_kernels

log = logging.getLogger("fasttune")


class FusedRMSNorm(RMSNorm):
    kernels = "triton"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        from fasttune.ops.rms_norm import rms_norm

        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps, residual=residual)  # (norm(x + residual), x + residual)


class FusedAttention(Attention):
    kernels = "triton"

    def rotate(self, q, k, rope):
        from fasttune.ops.rope import rope as rope_op

        return rope_op(q, k, *rope)  # rope = (position_ids, inv_freq) from FusedDecoder.rope_inputs


class FusedDecoder(Decoder):
    kernels = "triton"

    def rope_inputs(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return position_ids, self.inv_freq  # no [B, T, hd] tables: the kernel computes each angle


class FusedMLP(MLP):
    kernels = "triton"

    def forward(self, x):
        from fasttune.ops.swiglu import swiglu

        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedLossHead(LossHead):
    kernels = "triton"

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from fasttune.ops.linear_cross_entropy import linear_cross_entropy

        if torch.is_autocast_enabled(hidden.device.type):  # cast as autocast casts lm_head's inputs
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        total, count = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
        return total / count


FUSED = {RMSNorm: FusedRMSNorm, Attention: FusedAttention, Decoder: FusedDecoder, MLP: FusedMLP}
FUSED[LossHead] = FusedLossHead
REFERENCE = {fused: ref for ref, fused in FUSED.items()}


def apply_kernels(model: torch.nn.Module, requested: str = "auto", device: torch.device | None = None) -> str:
    """Give `model` the ops `requested` ("triton", "torch" or "auto": Triton on CUDA, the PyTorch math
    elsewhere; ops/__init__.py's choose_kernels decides and says why, logged). Returns "triton" or "torch"."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    name, why = choose_kernels(requested, device)
    swap = FUSED if name == "triton" else REFERENCE
    for path, module in model.named_modules():
        cls = type(module)
        if cls in swap:
            module.__class__ = swap[cls]
        elif cls not in REFERENCE and cls not in FUSED and isinstance(module, tuple(FUSED)):
            raise TypeError(
                f"apply_kernels: {path or 'the model'} is a {cls.__name__} (wrapped by FSDP or another "
                "tool); apply the kernels before wrapping"
            )
        elif "kernels" in vars(module):  # the LoRA layers carry the choice themselves
            module.kernels = name
    model.info.kernels = name
    log.info("kernels: %s (%s)", name, why)
    return name
