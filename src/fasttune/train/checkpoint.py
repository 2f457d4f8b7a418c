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
                         Python RNG, the world size, metrics, the resolved config) and the size and sha256 of
                         every other file (checkpoint_check.py), written last by rank 0: a folder without it
                         is incomplete
Every rank writes into `.step-00000500.tmp`; after a barrier rank 0 writes meta.json and renames the folder
into place; then `checkpoints/latest` is replaced (by a rename) to name it; then all but the newest `keep`
are removed. A crash at any point leaves the previous checkpoint whole and findable: `find_latest` trusts
`latest` only if it names a complete folder, and otherwise takes the newest complete one. Several machines
need `output_dir` on a shared filesystem. An operating-system error while writing (a full disk) is one
line naming the checkpoint and the free space; the partial folder is removed and the previous one kept.

A resume reads nothing before meta.json has been cross-checked and every file's size and digest verified
(checkpoint_check.py); a refused resume changes nothing on disk.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fasttune.errors import CheckpointError
from fasttune.io.atomic import write_atomic
from fasttune.train import checkpoint_check as check
from fasttune.train.distributed import SINGLE, Dist, agree_any, barrier

log = logging.getLogger("fasttune")
_NAME = check.NAME
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
    from torch.distributed.checkpoint import CheckpointException

    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    try:
        _all_or_none(lambda: _prepare(root, tmp) if dist.is_main else None, f"preparing {tmp}")
        _save_state(_state_dict(model, optimizer), tmp / "state")
        _all_or_none(lambda: _save_tensors(_rng_state(), tmp / f"rng-{dist.rank:05d}.safetensors"), str(tmp))
        digests = check.record_digests(tmp, dist)  # after every rank's files are written (the agreement)

        def finish():
            if dist.is_main:
                _publish(
                    root,
                    tmp,
                    final,
                    _full_meta(step, dist, optimizer, scheduler, sampler_state, meta, digests),
                )

        _all_or_none(finish, f"writing {final}")
    except (OSError, CheckpointException) as e:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # first: the free space reported is after the clean-up
        error = check.write_failure(e, root, final, _previous(root, final))
        if error is None:
            raise
        raise error from None
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_main:
        for old in _complete(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _all_or_none(work, what: str) -> None:
    """Run this rank's part of a write, then agree (the agreement is also the barrier): an OSError on any
    rank raises on every rank, so that no rank waits for a collective that a failed rank never joins."""
    error = None
    try:
        work()
    except OSError as e:
        error = e
    if agree_any(error is not None):
        if error is not None:
            raise error
        raise CheckpointError(f"{what} failed on another rank (its error says why)")


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
    (tmp / "state").mkdir(parents=True)


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    return rng


def _full_meta(step, dist, optimizer, scheduler, sampler_state, meta, digests) -> dict:
    state = random.getstate()
    pyrng = [state[0], list(state[1]), state[2]]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {
        "step": step,
        "world_size": dist.world_size,
        "optimizer": {"param_groups": groups},
        "scheduler": scheduler.state_dict(),
        "sampler": sampler_state,
        "python_rng": pyrng,
        **meta,
        "files": digests,
    }


def _publish(root: Path, tmp: Path, final: Path, full_meta: dict) -> None:
    """Rank 0: meta.json last (its presence marks the folder complete), the rename, then `latest`."""
    with open(tmp / "meta.json", "w") as f:
        json.dump(full_meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (a resumed run stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(root, final.name)


def _previous(root: Path, final: Path) -> Path | None:
    if not root.is_dir():
        return None
    kept = [p for p in _complete(root) if p != final]
    return kept[-1] if kept else None


def _write_latest(root: Path, name: str) -> None:
    write_atomic(root / "latest", name + "\n")
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
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        stored = HuggingFaceStorageReader(str(folder / "state")).read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
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
    sampler, ...). Works under any world size: each rank reads the slices of its own shards. meta.json is
    cross-checked and every file verified before anything is read into the model; a failure is one
    CheckpointError on every rank and nothing on disk is touched."""
    folder = Path(folder)
    meta = check.read_meta(folder)
    check.check_meta(folder, meta, len(optimizer.param_groups))
    if not (folder / "state").is_dir():
        raise CheckpointError(
            f"{folder}: no state/ folder; this checkpoint was written by an older fasttune (before sharded "
            "checkpoints) and cannot be resumed by this one"
        )
    check.verify(folder, meta, dist)
    _init_optimizer_state(optimizer)
    state = _state_dict(model, optimizer)
    _check_keys(folder, state)
    _load_state(state, folder)
    check.check_adam_steps(folder, optimizer, meta)
    for group, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k in group and k != "params"})
    scheduler.load_state_dict(meta["scheduler"])
    saved_world = meta["world_size"]
    rng_file = folder / f"rng-{dist.rank:05d}.safetensors"
    if dist.rank < saved_world:  # present: verified above
        _load_rng(rng_file)
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


def _load_state(state: dict[str, torch.Tensor], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader

    try:
        with torch.no_grad():
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder / "state")))
    except CheckpointException as e:  # a BaseException carrying each rank's error
        causes = "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in e.failures.items())
        raise CheckpointError(f"checkpoint {folder / 'state'} could not be read ({causes})") from None


def _load_rng(path: Path) -> None:
    from safetensors import SafetensorError

    try:
        rng = load_file(path)
        torch.set_rng_state(rng["torch_cpu"])
    except (SafetensorError, OSError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a random state fasttune wrote ({e!r})") from None
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def last_good(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint whose meta.json and files verify, and what was wrong with the newer
    ones (for the non-finite guard, which must not call a damaged checkpoint good). One process's view:
    it reads every file, so the caller runs it on one rank."""
    root = Path(output_dir) / "checkpoints"
    failed = []
    for folder in reversed(_complete(root)) if root.is_dir() else []:
        try:
            meta = check.read_meta(folder)
            check.check_meta(folder, meta, None)
            found = check.problems(folder, meta)
        except CheckpointError as e:
            found = [str(e)]
        if not found:
            return folder, failed
        failed.append(found[0])
    return None, failed


def resume_advice(output_dir: str | os.PathLike, dist: Dist = SINGLE) -> str:
    """The non-finite guard's advice: the newest checkpoint whose files verify (rank 0 reads them; the
    other ranks leave the naming to it), and the newer ones that do not, so that a damaged checkpoint is
    never called good."""
    skips = "set nonfinite_skips=K to skip up to K such steps."
    if not dist.is_main:
        return f"Rank 0 names the checkpoint to resume from; or {skips}"
    good, failed = last_good(output_dir)
    if good is None:
        bad = f" ({'; '.join(failed)})" if failed else ""
        return f"No checkpoint that verifies was written yet{bad}; {skips}"
    if not failed:
        return (
            f"The last good checkpoint is {good} (its files verify): resume from it with --resume, or {skips}"
        )
    return (
        f"The last good checkpoint is {good} (its files verify; newer ones do not: {'; '.join(failed)}): "
        f"move the newer ones out of {good.parent} and resume with --resume, or {skips}"
    )
