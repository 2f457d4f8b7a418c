"""Timing one op: the harness that `fasttune profile --op` and `benchmarks/ops/bench_<op>.py` share.

`time_op(fn, inputs)` runs `fn(*inputs)` once forward and backward (compiling the kernels on a GPU,
warming the interpreter's caches on the CPU), then reports median milliseconds of the forward, of the
forward + backward, and optionally of the backward alone and the peak memory a forward + backward
allocates above its inputs (CUDA only). On CUDA the medians come from `triton.testing.do_bench` (its
warm-up, repetitions and synchronisation); on the CPU from `reps` runs timed with `time.perf_counter`.
Gradients of the inputs that require grad are cleared before every timed run, so none accumulates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def grad_outputs(out) -> list[torch.Tensor]:
    """The outputs of an op that a backward runs from: the tensors among them that require grad."""
    outs = out if isinstance(out, tuple | list) else [out]
    return [o for o in outs if torch.is_tensor(o) and o.requires_grad]


def run_once(fn: Callable, inputs: list[torch.Tensor]) -> None:
    """One forward and (where an output requires grad) one backward, nothing timed."""
    outs = grad_outputs(fn(*inputs))
    if outs:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def median_ms(fn: Callable[[], object], leaves: list[torch.Tensor], cuda: bool, reps: int) -> float:
    """Median milliseconds of `fn()`, with the leaves' gradients cleared before each run."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=leaves, return_mode="median")
    times = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_op(
    fn: Callable,
    inputs: list[torch.Tensor],
    cuda: bool,
    reps: int = 5,
    backward: bool = False,
    memory: bool = False,
) -> dict:
    """{"forward_ms", "forward_backward_ms"} (None where no output requires grad), with `backward`
    also "backward_ms" (the backward of one retained graph, run repeatedly) and with `memory` on CUDA
    "peak_extra_mib". See the module docstring for how each is measured."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    leaves = [t for t in inputs if t.requires_grad]
    outs = grad_outputs(fn(*inputs))
    grads = [torch.randn_like(o) for o in outs]

    def both():
        torch.autograd.backward(grad_outputs(fn(*inputs)), grads)

    if outs:
        both()  # compiles the kernels (a GPU) or warms the interpreter's caches
    row: dict = {"forward_ms": median_ms(lambda: fn(*inputs), leaves, cuda, reps)}
    if backward:
        row["backward_ms"] = (
            median_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True), leaves, cuda, reps)
            if outs
            else None
        )
    row["forward_backward_ms"] = median_ms(both, leaves, cuda, reps) if outs else None
    outs = None  # free the retained graph before measuring memory
    if memory and cuda:
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both() if grads else fn(*inputs)
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row
