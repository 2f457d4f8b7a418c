"""The one rule for `strategy: auto`: which multi-GPU strategy a run takes. train/parallelize.py applies it
to a model it holds, and the planner (plan/memory.py) to a shape it counts, so a plan says what the run
will do. No torch: the inputs are counts.

DDP keeps a whole copy of the training state (weights, gradients, AdamW's two states) on every GPU; FSDP
shards it N ways at the price of gathering each block's weights per forward and backward. DDP is chosen
while that state takes at most DDP_MEMORY_SHARE of one GPU, leaving the rest for activations and the
allocator; past it, FSDP.
"""

from __future__ import annotations

from fasttune.choices import STRATEGIES
from fasttune.errors import FasttuneError

DDP_MEMORY_SHARE = 0.6


def decide_strategy(
    requested: str, nproc: int, device_type: str, state_bytes: float, gpu_bytes: float | None
) -> tuple[str, str]:
    """(strategy, why): "single" for one process; the requested one; or for "auto" on CUDA, ddp or fsdp by
    the training state's share of one GPU's `gpu_bytes` (ddp off CUDA: no device memory to save)."""
    if nproc <= 1:
        return "single", "one process"
    if requested not in STRATEGIES:
        raise FasttuneError(f"strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if requested != "auto":
        return requested, "requested"
    if device_type != "cuda" or not gpu_bytes:
        return "ddp", f"on the {device_type} there is no device memory to save"
    choice = "ddp" if state_bytes <= DDP_MEMORY_SHARE * gpu_bytes else "fsdp"
    why = (
        f"weights + gradients + AdamW states: {state_bytes / 2**30:.1f} GiB per GPU unsharded, "
        f"{100 * state_bytes / gpu_bytes:.0f}% of {gpu_bytes / 2**30:.1f} GiB"
    )
    return choice, why
