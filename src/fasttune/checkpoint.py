"""Atomic, resumable training checkpoints, with no pickle anywhere, in one format for one process or many.

A checkpoint is a folder `checkpoints/step-00000500/`:
  state/                 the trainable parameters (all of them for a full fine-tune, the adapters for LoRA)
                         as `model.<name>` and AdamW's states as `optim.<name>.<exp_avg|exp_avg_sq|step>`,
                         written with torch.distributed.checkpoint's Hugging Face storage: safetensors files,
                         one per writing rank, each header recording the slice of every tensor it holds
                         (FSDP shards). Reading plans the slices each reader needs from those headers, so a
                         checkpoint written by N processes resumes in M (or in one, without a process group).
  rng-<rank>.safetensors torch's CPU and CUDA generator states of each rank
  meta.json              everything else (step, optimizer hyperparameters, scheduler, sampler position,
                         Python RNG, the world size, metrics, the resolved config), written last by rank 0: a
                         folder without it is incomplete
Every rank writes into `.step-00000500.tmp`; after a barrier rank 0 writes meta.json and renames the folder
into place; then `checkpoints/latest` is replaced (by a rename) to name it; then all but the newest `keep`
are removed. A crash at any point leaves the previous checkpoint whole and findable: `find_latest` trusts
`latest` only if it names a complete folder, and otherwise takes the newest complete one. Several machines
need `output_dir` on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fasttune.distributed import SINGLE, Dist, barrier
from fasttune.errors import CheckpointError

log = logging.getLogger("fasttune")
_NAME = re.compile(r"step-(\d{8})")
_ADAM_STATES = ("exp_avg", "exp_avg_sq", "step")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state at the first step; a resume needs the tensors to load into now. Shapes,
    dtypes, devices and placements (DTensor shards) as AdamW's own `_init_group` makes them."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def _state_dict(model, optimizer) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint by stable names: parameter names, not optimizer indices, so that the
    keys mean the same thing under any world size."""
    out = {}
    for name, p in trainable_state(model).items():
        out[f"model.{name}"] = p
        for k, v in optimizer.state.get(p, {}).items():
            if k not in _ADAM_STATES:
                raise CheckpointError(
                    f"optimizer state {k!r} of {name}: only AdamW's states are checkpointed"
                )
            out[f"optim.{name}.{k}"] = v
    return out


def _save_state(state: dict[str, torch.Tensor], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    sampler_state: dict,
    meta: dict,
    keep: int = 2,
    dist: Dist = SINGLE,
) -> Path:
    """Every rank calls this at the same step (it holds collectives)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        (tmp / "state").mkdir(parents=True)
    barrier()
    try:
        _save_state(_state_dict(model, optimizer), tmp / "state")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        _save_tensors(rng, tmp / f"rng-{dist.rank:05d}.safetensors")
        barrier()
        if dist.is_main:
            state = random.getstate()
            pyrng = [state[0], list(state[1]), state[2]]
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            full_meta = {
                "step": step,
                "world_size": dist.world_size,
                "optimizer": {"param_groups": groups},
                "scheduler": scheduler.state_dict(),
                "sampler": sampler_state,
                "python_rng": pyrng,
                **meta,
            }
            with open(tmp / "meta.json", "w") as f:  # last: its presence marks the folder complete
                json.dump(full_meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (a resumed run stopped at once)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_latest(root, final.name)
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_main:
        for old in _complete(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def _complete(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    found = [
        p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / "meta.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def find_latest(output_dir: str | os.PathLike) -> tuple[Path | None, str]:
    """The checkpoint to resume from and why it was chosen."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None, f"no checkpoints in {root}"
    complete = _complete(root)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named and (root / named) in complete:
        return root / named, f"{root / named} (named by {pointer})"
    if not complete:
        return None, f"no complete checkpoint in {root}"
    why = f"{pointer} names {named!r}, which is not complete" if named else f"{pointer} is missing"
    return complete[-1], f"{complete[-1]} (the newest complete one; {why})"


def _check_keys(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Clear errors before any tensor is read: the names and global shapes the checkpoint holds against
    those of this model and optimizer."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        stored = HuggingFaceStorageReader(str(folder / "state")).read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint state ({e})") from None
    own = {k: tuple(v.shape) for k, v in state.items()}
    if set(stored) != set(own):
        missing, extra = sorted(set(own) - set(stored)), sorted(set(stored) - set(own))
        raise CheckpointError(
            f"{folder}: checkpoint tensors do not match the model and optimizer "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, shape in own.items():
        if tuple(stored[k].size) != shape:
            raise CheckpointError(f"{folder}: {k} has shape {tuple(stored[k].size)}, the model has {shape}")


def load_checkpoint(folder: str | os.PathLike, *, model, optimizer, scheduler, dist: Dist = SINGLE) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place on every rank; returns meta (step,
    sampler, ...). Works under any world size: each rank reads the slices of its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({e})") from None
    if not (folder / "state").is_dir():
        raise CheckpointError(
            f"{folder}: no state/ folder; this checkpoint was written by an older fasttune (before sharded "
            "checkpoints) and cannot be resumed by this one"
        )
    _init_optimizer_state(optimizer)
    state = _state_dict(model, optimizer)
    _check_keys(folder, state)
    with torch.no_grad():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder / "state")))
    for group, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k in group and k != "params"})
    scheduler.load_state_dict(meta["scheduler"])
    saved_world = meta.get("world_size", 1)
    rng_file = folder / f"rng-{dist.rank:05d}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    else:  # more ranks than wrote the checkpoint: a fresh stream per (step, rank)
        torch.manual_seed(hash((meta["step"], dist.rank)) % 2**63)
    if saved_world != dist.world_size and dist.is_main:
        log.info(
            "checkpoint written by %d process(es), resumed in %d: parameters, optimizer state and the "
            "sampler position carry over%s",
            saved_world,
            dist.world_size,
            "; the random streams (LoRA dropout) of the added ranks start fresh"
            if dist.world_size > saved_world
            else "",
        )
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta
