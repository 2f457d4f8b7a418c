"""Processes, not models: the process group, who is rank 0, the few collectives the loop needs, the NCCL
settings consumer GPUs need, and `fasttune run --nproc N` (a torchrun launch). How the model is split
across the processes (FSDP2 or DDP) is parallelize.py's job.

A run is distributed when torchrun (or any launcher with the same contract) has set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The process group is gloo on the CPU and `cpu:gloo,cuda:nccl`
on GPUs, so small host-side agreements (the GeForce decision below) run on gloo before NCCL starts.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fasttune.errors import FasttuneError

log = logging.getLogger("fasttune")

# GeForce cards (RTX 4090, 3090, ...) have no peer-to-peer over PCIe in their drivers, and a box of them
# has no InfiniBand: NCCL's P2P transport then hangs or fails at the first collective, and its IB probe
# can pick a wrong interface. With both off NCCL goes through host shared memory, which works on every
# such box. The settings must be the same on every rank (NCCL negotiates transports between peers), so
# the ranks agree first: if any rank has a GeForce card, every rank turns them off.
CONSUMER_NCCL_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}


def is_consumer_gpu(name: str) -> bool:
    """GeForce and TITAN cards: "NVIDIA GeForce RTX 4090", "NVIDIA TITAN RTX"."""
    n = name.lower()
    return "geforce" in n or "titan" in n


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched() -> bool:
    """True under torchrun (the environment names this process's rank in a group of several)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> Dist:
    """Join the process group torchrun set up (a no-op for a single process); returns this rank's place.
    On CUDA each process takes the GPU of its LOCAL_RANK."""
    if not launched():
        return SINGLE
    env = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return env
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        # No NCCL call has run yet (communicators are created lazily at the first CUDA collective), so
        # NCCL still reads the environment set here.
        name = torch.cuda.get_device_name(env.local_rank)
        consumer = agree_any(is_consumer_gpu(name))
        if consumer:
            os.environ.update(CONSUMER_NCCL_ENV)
        if env.is_main:
            log.info(
                "NCCL: %s",
                "GeForce/TITAN GPU on some rank: peer-to-peer and InfiniBand off on every rank "
                f"({', '.join(f'{k}={v}' for k, v in CONSUMER_NCCL_ENV.items())})"
                if consumer
                else "data-center GPUs on every rank: NCCL chooses its transports",
            )
    elif device.type == "cpu":
        dist.init_process_group(backend="gloo")
    else:
        raise FasttuneError(f"distributed training runs on cuda or cpu, not {device.type}")
    if env.is_main:
        log.info("distributed: %d processes (%s)", env.world_size, dist.get_backend())
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_any(flag: bool) -> bool:
    """True on every rank if it is true on any. A CPU tensor: with `cpu:gloo,cuda:nccl` the default group
    sends it through gloo, so this works before NCCL exists."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place, the sum over ranks (identity for one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# The global batch over N processes


@dataclass(frozen=True)
class StepLayout:
    """One optimizer step: `world_size` processes x `accumulate` micro-batches, each packed to `budget`
    tokens at most."""

    accumulate: int
    budget: int
    world_size: int

    @property
    def per_step(self) -> int:
        """Micro-batches in one optimizer step, over all processes."""
        return self.accumulate * self.world_size

    @property
    def global_tokens(self) -> int:
        return self.per_step * self.budget

    def describe(self, micro_batch_tokens: int) -> str:
        return (
            f"{self.world_size} process(es) x {self.accumulate} micro-batch(es) of {self.budget} tokens per "
            f"step: the global batch of {self.global_tokens} tokens (micro_batch_tokens {micro_batch_tokens} "
            "is the most one micro-batch holds)"
        )


def split_global_batch(
    tokens_per_step: int | None,
    micro_batch_tokens: int,
    max_seq_len: int,
    world_size: int,
    budget: int | None = None,
) -> StepLayout:
    """`tokens_per_step` (default: one micro-batch) is the global batch whatever the number of processes:
    it is split into world_size x accumulate equal micro-batches, with the fewest micro-batches whose
    budget is at most `micro_batch_tokens`. Rounding up to whole micro-batches of `micro_batch_tokens`
    per process would multiply the global batch (by N for the default of one micro-batch), changing the
    recipe; a split that cannot be equal, or whose micro-batches could not hold a sequence of
    `max_seq_len`, is refused with the numbers. `budget`: the one a resumed checkpoint packed, kept when
    this world size can share its micro-batches equally (the same bins: the same trajectory)."""
    total, w = tokens_per_step or micro_batch_tokens, world_size
    what = f"tokens_per_step {total}" if tokens_per_step else f"the global batch (micro_batch_tokens {total})"
    if budget is not None:
        if total % budget == 0 and (total // budget) % w == 0 and max_seq_len <= budget <= micro_batch_tokens:
            return StepLayout(total // budget // w, budget, w)
        bins = total // max(budget, 1)
        raise FasttuneError(
            f"--resume: the checkpoint packs {bins} micro-batch(es) of {budget} tokens per step, which {w} "
            f"process(es) cannot share equally: resume with a number of processes that divides {bins}"
        )
    accumulate = math.ceil(total / (w * micro_batch_tokens))
    parts = w * accumulate
    if total % parts:
        lower, upper = total // parts * parts, (total // parts + 1) * parts
        raise FasttuneError(
            f"{what} cannot be split into {w} process(es) x {accumulate} micro-batch(es) of equal size "
            f"(micro_batch_tokens {micro_batch_tokens} at most): set tokens_per_step to a multiple of "
            f"{parts}, e.g. {lower} or {upper}"
        )
    share = total // parts
    if share < max_seq_len:
        raise FasttuneError(
            f"{what} over {w} process(es) x {accumulate} micro-batch(es) gives micro-batches of {share} "
            f"tokens, too short for data.max_seq_len {max_seq_len}: set tokens_per_step to at least "
            f"{parts * max_seq_len}, or lower data.max_seq_len"
        )
    return StepLayout(accumulate, share, w)


# ----------------------------------------------------------------------------------------------------------
# `fasttune run --nproc N`


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `fasttune <argv>` in N processes on this machine. --standalone
    picks a free rendezvous port on localhost; several machines use torchrun's own rendezvous arguments
    (see the README)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fasttune.cli",
        *argv,
    ]


def launch(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun; its exit status becomes the command's."""
    if launched():
        raise FasttuneError(
            "--nproc inside a torchrun launch: run `fasttune run` without --nproc under torchrun"
        )
    if nproc < 2:
        raise FasttuneError(f"--nproc must be at least 2 to launch several processes, got {nproc}")
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise FasttuneError(
            f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "fasttune runs one process per GPU"
        )
    cmd = launch_command(nproc, argv)
    print("launching: " + " ".join(cmd[1:]), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
