"""One optimizer step: the function `fasttune run`, `fasttune bench` and the CI gate all train through.

A step takes its micro-batches (packed `Batch`es already on the device) through forward under the run's
autocast, backward, gradient sync, clipping, the non-finite guard and the optimizer, and returns its
numbers. The loss of a step is the sum of the cross-entropy over all its target tokens divided by their
number: each micro-batch's mean loss is weighted by its share of the step's targets before backward, so
micro-batches of unequal size count per token, not per batch. The count is the whole step's (all ranks'),
known on the host from packing, so normalising needs no device sync. DDP and FSDP average gradients over
the W ranks, so the weight is multiplied by W to make the result the global sum.

The guard: a non-finite loss or gradient norm means no optimizer update. The gradients are dropped and the
scheduler still advances, so a skipped step keeps the schedule aligned with the step count; whether the run
then skips the step or stops is the caller's policy, read from `StepResult.finite`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fasttune.data.packing import Batch, TokenizedData, collate, count_targets
from fasttune.regions import region
from fasttune.train.distributed import SINGLE, Dist, all_reduce_sum
from fasttune.train.metrics import peak_memory_gib
from fasttune.train.parallelize import Parallel


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross-entropy over the step's target tokens (all ranks)
    grad_norm: float  # the global gradient norm before clipping
    lr: float  # the learning rate after the scheduler's step (the next step's)
    tokens: int  # real tokens in the step (padding excluded)
    targets: int  # trained target tokens in the step
    finite: bool  # False: the guard blocked the optimizer update
    stop: bool = False  # some rank asked to stop (several processes: agreed in the step's all-reduce)

    def record(self, step: int, seconds: float, fpt: float, peak: float | None, world: int, device) -> dict:
        """The step's line in metrics.jsonl (and what `on_step` receives); MFU over all `world` GPUs."""
        return {
            "step": step,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "tokens": self.tokens,
            "targets": self.targets,
            "tokens_per_s": self.tokens / seconds,
            "mfu": self.tokens / seconds * fpt / (peak * world) if peak else None,
            "memory_gib": peak_memory_gib(device),
        }


def step_batches(data: TokenizedData, bins: list[list[int]], budget: int, env: Dist, device):
    """This rank's micro-batches of a step, on the device, and the whole step's target and token counts.
    Every rank draws the same bins and takes every N-th; under several processes the counts come from all
    the bins, on the host: no collective."""
    micro = [
        collate(data, bins[i], pad_to=budget).to(device) for i in range(env.rank, len(bins), env.world_size)
    ]
    if env.enabled:
        targets = sum(count_targets(data, b) for b in bins)
        tokens = int(sum(data.lengths[i] for b in bins for i in b))
    else:
        targets = sum(b.num_targets for b in micro)
        tokens = sum(b.num_tokens for b in micro)
    return micro, targets, tokens


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls and attention of a run compute in (bf16 under autocast, or the weights')."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def autocast(precision: str, device: torch.device, par: Parallel | None = None):
    """bf16 compute over fp32 master weights; none when FSDP casts the parameters to bf16 itself."""
    if precision == "bf16" and not (par is not None and par.fsdp_mixed_precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_finite(loss: float, grad_norm: float) -> bool:
    """The guard's test: an update is made only from a finite loss and a finite gradient norm."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


def _loss(par: Parallel, b: Batch) -> torch.Tensor:
    return par.loss(b.input_ids, b.targets, b.position_ids, b.cu_seqlens, b.max_seqlen)


def _forward_backward(
    par: Parallel, micro: Sequence[Batch], targets: int, precision: str, world: int, device
):
    """The step's summed loss (a device tensor, no sync): sum over micro-batches of mean loss x targets."""
    loss_sum = torch.zeros((), device=device)
    for k, b in enumerate(micro):
        with par.gradient_sync(k == len(micro) - 1):  # DDP: all-reduce on the last one only
            with autocast(precision, device, par):
                loss = _loss(par, b)
            # DDP and FSDP average gradients over ranks: x W makes it the global sum
            (loss * (b.num_targets / targets * world)).backward()
        loss_sum += loss.detach().float() * b.num_targets
    return loss_sum


def _agree(loss_sum: torch.Tensor, env: Dist, stop_requested: Callable[[], bool] | None, device):
    """One all-reduce per step under several processes: the summed loss, and whether any rank was asked
    to stop (read after backward, so a signal during this step's compute is seen by this step)."""
    if not env.enabled:
        return loss_sum, False
    wants = bool(stop_requested()) if stop_requested is not None else False
    agreed = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(wants), device=device)]))
    return agreed[0], bool(agreed[1].item() > 0)


def train_step(
    par: Parallel,
    micro: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    params: list[torch.Tensor],
    targets: int,
    tokens: int,
    precision: str,
    grad_clip: float,
    device: torch.device,
    env: Dist = SINGLE,
    stop_requested: Callable[[], bool] | None = None,
) -> StepResult:
    """One optimizer step over this rank's micro-batches. `targets` and `tokens` are the whole step's
    (every rank's) counts; `params` are the trainable parameters (clipped together); grad_clip 0 logs the
    norm without clipping."""
    loss_sum = _forward_backward(par, micro, targets, precision, env.world_size, device)
    loss_sum, stop = _agree(loss_sum, env, stop_requested, device)
    loss = (loss_sum / targets).item()
    grad_norm = par.clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    finite = is_finite(loss, grad_norm)
    if finite:
        with region("optimizer"):  # named in `fasttune profile` traces, a no-op otherwise
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    else:  # no update from a non-finite step; the schedule still moves on with the step count
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return StepResult(loss, grad_norm, scheduler.get_last_lr()[0], tokens, targets, finite, stop)
