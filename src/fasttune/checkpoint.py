"""Atomic, resumable training checkpoints, with no pickle anywhere.

A checkpoint is a folder `checkpoints/step-00000500/`:
  model.safetensors      the trainable parameters (all of them for a full fine-tune, the adapters for LoRA)
  optimizer.safetensors  the optimizer's per-parameter state tensors, keyed `<param index>.<name>`
  rng.safetensors        torch's CPU and CUDA generator states
  meta.json              everything else (step, optimizer groups, scheduler, sampler position, Python RNG,
                         metrics, the resolved config), written last: a folder without it is incomplete
It is written under a temporary name and renamed into place; then `checkpoints/latest` is replaced (by a
rename) to name it; then all but the newest `keep` are removed. A crash at any point leaves the previous
checkpoint whole and findable: `find_latest` trusts `latest` only if it names a complete folder, and
otherwise takes the newest complete one.
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

from fasttune.errors import CheckpointError

log = logging.getLogger("fasttune")
_NAME = re.compile(r"step-(\d{8})")


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
) -> Path:
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _save_tensors(trainable_state(model), tmp / "model.safetensors")
        opt = optimizer.state_dict()
        opt_tensors, opt_rest = {}, {}
        for idx, state in opt["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    opt_tensors[f"{idx}.{k}"] = v
                else:
                    opt_rest[f"{idx}.{k}"] = v
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        _save_tensors(rng, tmp / "rng.safetensors")
        state = random.getstate()
        pyrng = [state[0], list(state[1]), state[2]]
        full_meta = {
            "step": step,
            "optimizer": {"param_groups": opt["param_groups"], "state_scalars": opt_rest},
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
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _complete(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(folder: str | os.PathLike, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns meta (step, sampler, ...)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        params = load_file(folder / "model.safetensors")
        opt_tensors = load_file(folder / "optimizer.safetensors")
        rng = load_file(folder / "rng.safetensors")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({e})") from None
    own = trainable_state(model)
    if set(params) != set(own):
        missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        raise CheckpointError(
            f"{folder}: checkpoint parameters do not match the model "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for name, p in own.items():
            if params[name].shape != p.shape:
                raise CheckpointError(
                    f"{folder}: {name} has shape {tuple(params[name].shape)}, the model has {tuple(p.shape)}"
                )
            p.copy_(params[name])
    state: dict[int, dict] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["optimizer"]["state_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta
