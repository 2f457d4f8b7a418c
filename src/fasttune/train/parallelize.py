"""The one place that changes how an unchanged model runs: activation checkpointing, torch.compile per
decoder block, and the split over processes (FSDP2 or DDP). Applied from outside; parameter names do not
change, so checkpoints and exports see the same keys in every mode.

Order, per decoder block: compile the block's own forward, then wrap the compiled function in activation
checkpointing (so the recomputation in the backward pass runs the compiled code too), then shard the
block with FSDP2, whose hooks sit outside both: they all-gather the block's parameters before its forward
and again before its backward (where the checkpointed forward is recomputed), and reduce-scatter its
gradients after. The other order for the first two (compile a block whose forward is already a checkpoint
wrapper, e.g. with `nn.Module.compile`) traced no graph at all in torch 2.13: the block silently ran
eager. The tests check that graphs were compiled.

Strategies for several processes:
  ddp   every rank holds the whole model and optimizer; gradients are all-reduced in buckets during the
        backward pass (skipped on all but the last micro-batch of a step). Fastest when the training state
        fits on one GPU.
  fsdp  FSDP2 `fully_shard` per decoder block and then the root: parameters, gradients and AdamW states are
        split over the ranks (1/N each), one block is gathered at a time. Gradients are reduce-scattered
        after every micro-batch, which keeps them sharded (skipping the sync would hold full gradients).
        With precision bf16 the policy keeps fp32 master shards, gathers bf16 parameters for compute and
        reduces gradients in fp32 (so no autocast is needed); `cpu_offload` keeps shards on the host.
  auto  ddp when the weights, gradients and AdamW states fit in 60% of one GPU (the rest for activations,
        the loss and the allocator), else fsdp; ddp on the CPU.
Both average gradients over ranks; the loop multiplies each loss by the world size so that the summed
gradient equals a single process's over the same global batch (the loss is already normalised by the
global number of target tokens).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fasttune.errors import FasttuneError
from fasttune.models.model import CausalLM
from fasttune.train.distributed import SINGLE, Dist
from fasttune.train.strategy import decide_strategy

log = logging.getLogger("fasttune")


class _LossModule(nn.Module):
    """DDP prepares its gradient hooks in `forward`: routing the loss through it is what makes them fire.
    (CausalLM.loss is a method, not its forward.)"""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, position_ids=None, cu_seqlens=None, max_seqlen=None):
        return self.model.loss(input_ids, targets, position_ids, cu_seqlens, max_seqlen)


@dataclass
class Parallel:
    """The model as the loop runs it. `model` is the CausalLM itself (sharded in place under FSDP)."""

    model: CausalLM
    strategy: str = "single"  # single | ddp | fsdp
    world_size: int = 1
    fsdp_mixed_precision: bool = False  # FSDP casts parameters to bf16 itself: no autocast around it
    _ddp: nn.Module | None = field(default=None, repr=False)

    def loss(self, input_ids, targets, position_ids=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        if self._ddp is not None:
            return self._ddp(input_ids, targets, position_ids, cu_seqlens, max_seqlen)
        return self.model.loss(input_ids, targets, position_ids, cu_seqlens, max_seqlen)

    def gradient_sync(self, enabled: bool):
        """DDP: all-reduce only on the step's last micro-batch. FSDP and one process: always (a no-op)."""
        if self._ddp is not None and not enabled:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """The global gradient norm before clipping (under FSDP each rank holds shards: the norm of the
        local pieces is completed across ranks before it is used)."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if hasattr(total, "full_tensor"):  # a DTensor (FSDP): the sum of squares over all shards
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return float(total)


def training_state_bytes(model: nn.Module, precision: str) -> int:
    """Weights + gradients + AdamW states held by one process without sharding."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            state = 2 if precision == "bf16-pure" else 4  # AdamW's states follow the parameter's dtype
            total += p.numel() * (p.element_size() + 2 * state)
    return total


def choose_strategy(
    requested: str, model: nn.Module, device: torch.device, precision: str, dist: Dist
) -> str:
    """train/strategy.py's rule for this model on this device; "auto"'s choice is logged with its reason."""
    if not dist.enabled:
        return "single"
    need = training_state_bytes(model, precision)
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    choice, why = decide_strategy(requested, dist.world_size, device.type, need, have)
    if requested == "auto":
        log.info("strategy auto: %s (%s)", choice, why)
    return choice


def _compile_and_checkpoint(model: CausalLM, activation_checkpointing: bool, compile: bool) -> None:
    """Activation checkpointing keeps only each block's input for the backward pass and recomputes the
    rest: activation memory falls from layers x (block activations) to layers x H per token, for about a
    third more compute. compile: one graph, reused by every block (they share the code and shapes)."""
    if not (activation_checkpointing or compile):
        return
    if compile:
        log.info(
            "torch.compile: with the SDPA reference attention each block's graph breaks where packed "
            "sequences are split (cu_seqlens is read on the host); flash-attn avoids that"
        )
    for layer in model.model.layers:
        forward = layer.forward
        if compile:
            forward = torch.compile(forward)
        if activation_checkpointing:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        layer.forward = forward
    log.info(
        "decoder blocks: %s",
        " + ".join(
            name
            for name, on in (
                ("torch.compile", compile),
                ("activation checkpointing", activation_checkpointing),
            )
            if on
        ),
    )


def shard_fsdp(model: CausalLM, device: torch.device, precision: str, cpu_offload: bool, world_size: int):
    """FSDP2: each decoder block is one unit (gathered, used, freed), the root holds the embedding, the
    final norm and the head. `loss` and `logits` are registered so calling them runs the root's hooks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (world_size,))
    if precision == "bf16":  # fp32 master shards; bf16 compute; gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:  # bf16-pure reduces bf16 gradients in fp32 too; fp32 stays fp32
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    offload = None
    if cpu_offload:
        if device.type != "cuda":
            log.info("cpu_offload: the model already lives in host memory on %s; nothing to offload", device)
        else:
            offload = CPUOffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if offload is not None:
        kwargs["offload_policy"] = offload
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "loss")
    register_fsdp_forward_method(model, "logits")
    log.info(
        "FSDP2 over %d ranks: %d blocks + root; %s%s",
        world_size,
        len(model.model.layers),
        "bf16 parameters, fp32 gradient reduction" if precision == "bf16" else f"{precision} parameters",
        ", CPU offload" if offload is not None else "",
    )


def parallelize(
    model: CausalLM,
    activation_checkpointing: bool = False,
    compile: bool = False,
    *,
    dist: Dist = SINGLE,
    strategy: str = "single",
    precision: str = "fp32",
    cpu_offload: bool = False,
    device: torch.device | None = None,
    sharded: bool = False,
) -> Parallel:
    """Apply compile and activation checkpointing, then the strategy (from `choose_strategy`).
    sharded: the model was already given to `shard_fsdp` (it was built on the meta device and loaded
    shard by shard)."""
    _compile_and_checkpoint(model, activation_checkpointing, compile)
    device = device or next(model.parameters()).device
    if strategy == "single":
        return Parallel(model)
    if strategy == "fsdp":
        if not sharded:
            shard_fsdp(model, device, precision, cpu_offload, dist.world_size)
        return Parallel(model, "fsdp", dist.world_size, fsdp_mixed_precision=precision == "bf16")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in the all-reduce buckets, not in a second copy
        ddp = DistributedDataParallel(_LossModule(model), device_ids=ids, gradient_as_bucket_view=True)
        log.info("DDP over %d ranks", dist.world_size)
        return Parallel(model, "ddp", dist.world_size, _ddp=ddp)
    raise FasttuneError(f"unknown strategy {strategy!r}")


@torch.no_grad()
def init_lora_sharded(model: CausalLM) -> None:
    """Adapters of a model built on the meta device and sharded. Every rank draws the full tensors from
    the same seeded stream (on the parameters' device, as one process does) and keeps its own shard. The
    draws repeat those of `LoraLinear.__init__` on a real model, in the same module order: nn.Linear's
    own kaiming init of A and of B, then `reset_lora_parameters` (kaiming A, zero B); so a sharded run
    starts from the adapters a one-process run with the same seed has. Adapters are small: r x (in + out)
    per layer."""
    from torch.distributed.tensor import distribute_tensor

    from fasttune.models.lora import LoraLinear

    def kaiming(shape, device):
        t = torch.empty(shape, dtype=torch.float32, device=device)
        return torch.nn.init.kaiming_uniform_(t, a=5**0.5)

    for m in model.modules():
        if not isinstance(m, LoraLinear):
            continue
        a_param, b_param = m.lora_A.weight, m.lora_B.weight
        device = a_param.device
        kaiming(a_param.shape, device)  # nn.Linear(in, r)'s init, overwritten in LoraLinear.__init__
        kaiming(b_param.shape, device)  # nn.Linear(r, out)'s init, overwritten by zeros
        a = kaiming(a_param.shape, device)
        b = torch.zeros(b_param.shape, dtype=torch.float32, device=device)
        for param, full in ((a_param, a), (b_param, b)):
            full = full.to(param.dtype)
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
