"""Host memory of a run (resident set of the training process), phase by phase, on the device it runs on.

On the CPU the device memory is host memory: the step holds what plan_memory.memory_rows counts for the
PyTorch path (kernels=torch, which CPU runs take), without the CUDA rows. On a GPU the host holds the
Python and CUDA runtimes, the file pages being read while loading and the copy being written at the end.

  runtime  Python, torch and fasttune imported: 371 MiB measured (VmRSS after `import fasttune.train.loop`,
           torch 2.13 CPU build, Python 3.11), taken as 0.4 GiB. A CUDA process adds the driver's and
           libraries' host memory: 1.5 GiB, assumed.
  load     the weights in their training dtype, plus the safetensors file pages mapped while they are
           read (weights.read_tensors maps each file; its pages count in RSS until it is unmapped).
  step     (CPU) weights, adapters, gradients, AdamW states, and the larger of the backward's activations
           + chunked loss and the optimizer step's temporaries (foreach AdamW: one per trainable parameter).
  end      (CPU) weights and AdamW states (gradients are freed by zero_grad(set_to_none)) plus the larger
           of: the checkpoint writer's two copies of the trainable state (CHECKPOINT_COPIES, measured);
           the copy save_model makes of one shard (<= 5 GB) when the saved dtype differs from the
           parameters' plus, with lora.merge, the base read again on the CPU in the merge dtype.
  peak     the largest phase. tests/test_hardening_resources.py holds a CPU run's measured VmHWM to at most
           1.3 x this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fasttune.plan.memory import GIB, Options, Shape, memory_rows

RUNTIME_BYTES = 0.4 * GIB  # measured 371 MiB (see the module docstring)
CUDA_HOST_BYTES = 1.5 * GIB  # assumed
SHARD_BYTES = 5e9  # save_model's max_shard_size default
# A checkpoint (checkpoint.py: dcp.save through HuggingFaceStorageWriter) held two copies of the state it
# writes: measured 3.95 GiB over the end of a run's 2.36 GiB, for 1.86 GiB of fp32 parameters and AdamW
# states (the 2-layer Qwen2.5-0.5B of benchmarks/memory/host_memory.py). Not fixed here: counted.
CHECKPOINT_COPIES = 2


@dataclass
class HostPlan:
    load: float
    step: float
    end: float
    device: str

    @property
    def peak(self) -> float:
        return max(self.load, self.step, self.end)

    def describe(self) -> str:
        return (
            f"host memory of a run on {self.device}: {self.peak / GIB:.2f} GiB peak (load "
            f"{self.load / GIB:.2f}, step {self.step / GIB:.2f}, end of run {self.end / GIB:.2f})"
        )


def host_plan(
    shape: Shape,
    o: Options,
    device: str,
    stored_bytes: float,
    save_itemsize: int,
    merge: bool = False,
) -> HostPlan:
    """Bytes of host memory by phase. device: "cpu" or "cuda"; stored_bytes: the model's safetensors
    files; save_itemsize: bytes per element of the saved dtype; merge: lora.merge at the end."""
    cpu = device == "cpu"
    runtime = RUNTIME_BYTES + (0 if cpu else CUDA_HOST_BYTES)
    base_itemsize = 2 if o.method != "full" and o.precision != "fp32" else 4
    if o.method == "full" and o.precision == "bf16-pure":
        base_itemsize = 2
    weights = shape.total * base_itemsize
    save_copy = 0.0 if save_itemsize == base_itemsize else min(SHARD_BYTES, shape.total * save_itemsize)
    merge_bytes = shape.total * 4 + stored_bytes if merge and o.method != "full" else 0.0
    trainable = shape.total if o.method == "full" else shape.lora
    state_itemsize = base_itemsize if o.method == "full" else 4
    checkpoint = CHECKPOINT_COPIES * trainable * state_itemsize * 3  # parameter + two AdamW states
    if not cpu:
        largest = shape.largest_linear * 4  # one tensor staged on the host on its way to the GPU
        return HostPlan(
            runtime + stored_bytes + largest,
            runtime,
            runtime + max(checkpoint, min(SHARD_BYTES, shape.total * save_itemsize) + merge_bytes),
            device,
        )
    rows, _ = memory_rows(shape, replace(o, kernels="torch", device="cpu", nproc=1), "single")
    parts = {r.part: r.bytes for r in rows if r.part != "overhead"}
    kept = parts["weights"] + parts.get("adapters", 0.0) + parts["optimizer"]
    # The backward holds the activations and the loss's buffers; AdamW's step comes after they are freed,
    # and on the CPU (foreach, not fused) it makes one temporary per trainable parameter (sqrt(v) + eps).
    adam_temp = parts["gradients"]
    moving = max(parts["activations"] + parts["loss"], adam_temp)
    return HostPlan(
        runtime + weights + stored_bytes,
        runtime + kept + parts["gradients"] + moving,
        runtime + kept + max(checkpoint, save_copy + merge_bytes),
        device,
    )


def host_plan_for_config(cfg) -> HostPlan:
    """The host plan of a run config with a model folder (`cfg.model`), on the device it resolves to."""
    from fasttune.devices import resolve_device
    from fasttune.models.weights import check_checkpoint, parse_dtype

    # "auto" as a run resolves it; a named device is planned for as named (it need not exist here)
    device = str(resolve_device("auto")) if cfg.device == "auto" else cfg.device
    plan = check_checkpoint(cfg.model)
    stored = float(sum(f.stat().st_size for f in set(plan.location.values())))
    hf = plan.config.hf
    save_dtype = parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    o = Options(
        method=cfg.method,
        precision=cfg.precision,
        micro_batch_tokens=cfg.micro_batch_tokens,
        activation_checkpointing=cfg.activation_checkpointing,
        kernels="torch" if cfg.kernels == "torch" or device.startswith("cpu") else "triton",
        lora=cfg.lora.to_lora_config(),
        device="cpu" if device.startswith("cpu") else "cuda",
    )
    shape = Shape.of(plan.config, o.lora, str(cfg.model))
    return host_plan(
        shape,
        o,
        "cpu" if device.startswith("cpu") else "cuda",
        stored,
        save_dtype.itemsize,
        merge=cfg.lora.merge,
    )
