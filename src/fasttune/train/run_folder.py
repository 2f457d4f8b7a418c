"""Who owns an output folder, and whether this run may write into it.

A run folder carries a marker (`.fasttune-run.json`: the status, running or finished) and a lock file
(`.fasttune.lock`, held with `fcntl.flock` for the whole run by the one process that writes logs: rank 0
under torchrun). The kernel drops a flock when its holder dies, even by `kill -9`, so a crashed run never
leaves the folder locked, and a second run into a folder being written gets one error naming the holder's
pid. Before anything is written:

- `output_dir` may not be empty (the current folder), the current folder or one above it, or a folder
  holding the data files or the model: a run writes `data/`, `model/` and `checkpoints/` there.
- A non-empty folder that is not a fasttune run is refused unless `force` (then written into; nothing of
  its own is removed).
- A finished run is refused (resume it to extend it, or choose another folder); an unfinished one with a
  checkpoint is refused with the advice to `--resume`; `force` starts over, removing only the names a run
  writes. An unfinished run with no checkpoint has nothing to resume: it starts over.
- `resume`: the saved `config.yaml` is compared with the new config (`config_diff.py`); keys that change
  the trajectory refuse unless `allow_config_change`.
`config.yaml` is (re)written only after these checks pass (on a resume, once the checkpoint has loaded),
through a temporary name and a rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from fasttune.errors import FasttuneError
from fasttune.io.atomic import write_atomic
from fasttune.train import distributed
from fasttune.train.checkpoint import find_latest
from fasttune.train.config import RunConfig
from fasttune.train.config_diff import ConfigChanges, compare_configs
from fasttune.train.distributed import Dist

MARKER = ".fasttune-run.json"
LOCK = ".fasttune.lock"
# Everything a run writes at the top of its folder: what starting over removes, and nothing else.
OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "config.yaml",
    "model",
    "adapter",
    "merged",
    "base_model",
    "eval.json",
    "data",
    "tokenizer",
    "tensorboard",
)
_SNIFF_BYTES = 1 << 20  # a config.yaml or metrics.jsonl line of ours is far below 1 MiB


class RunFolderError(FasttuneError):
    """An output folder this run may not write into, with what to do instead."""


# ----------------------------------------------------------------------------------------------------------
# Reading a folder


def check_location(cfg: RunConfig) -> Path:
    """The output folder, resolved; refused where a run would write over its own inputs."""
    if not str(cfg.output_dir).strip():
        raise RunFolderError("output_dir is empty (that is the current folder): name a folder for the run")
    out = Path(cfg.output_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(out):
        raise RunFolderError(
            f"output_dir {cfg.output_dir!r} is the current folder or contains it: name a folder for the run"
        )
    inputs = [("data file", Path(f).resolve()) for f in cfg.data.files]
    if cfg.model is not None:
        inputs.append(("model folder", Path(cfg.model).resolve()))
    for what, path in inputs:
        if path.is_relative_to(out):
            raise RunFolderError(
                f"output_dir {out} holds the {what} {path}: the run writes data/, model/ and checkpoints/ "
                "there; choose a folder of its own"
            )
    return out


def _sniff_yaml(path: Path) -> dict | None:
    try:
        if path.stat().st_size > _SNIFF_BYTES:
            return None
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def _is_our_config(path: Path) -> bool:
    raw = _sniff_yaml(path)
    return raw is not None and "method" in raw and set(raw) <= set(RunConfig().to_dict())


def _is_our_metrics(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(_SNIFF_BYTES)
        record = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "step" in record and "loss" in record


def is_run_folder(out: Path) -> bool:
    """Written by fasttune: its marker or lock, or (runs from before the marker) a config.yaml or
    metrics.jsonl of ours; `fasttune profile` writes `profile/` into a run's folder."""
    return (
        (out / MARKER).is_file()
        or (out / LOCK).is_file()
        or (out / "profile" / "profile.json").is_file()
        or _is_our_config(out / "config.yaml")
        or _is_our_metrics(out / "metrics.jsonl")
    )


def _status(out: Path) -> dict:
    try:
        status = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def finished_because(out: Path) -> str | None:
    """Why the run in `out` counts as finished, or None."""
    status = _status(out)
    if status.get("status") == "finished":
        return f"finished at step {status.get('step')}"
    for name in ("model", "adapter"):  # runs from before the marker: the export is the last thing written
        if (out / name).is_dir():
            return f"{name}/ written"
    return None


# ----------------------------------------------------------------------------------------------------------
# The lock


class FolderLock:
    """An exclusive flock on OUT/.fasttune.lock, holding this process's pid. The file stays when released:
    unlinking it would let a run that opened it just before lock an inode nobody else can see."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"{out} is being written by another fasttune run (pid {holder}, lock {self.path}): wait for "
                "it to end or stop it, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


# ----------------------------------------------------------------------------------------------------------
# Claiming a folder for a run


class RunFolder:
    """A claimed folder: the lock (rank 0 only), what the config check found (rank 0 only), and whether
    the resume goes on with changed hyperparameters (every rank: each applies them to its optimizer)."""

    def __init__(
        self,
        out: Path,
        lock: FolderLock | None = None,
        changes: ConfigChanges | None = None,
        config_yaml: str | None = None,
    ):
        self.out, self.lock, self.changes, self.config_yaml = out, lock, changes, config_yaml
        self.reapply = changes is not None and bool(changes.trajectory or changes.extension)

    def start(self) -> None:
        """Mark the folder running and write the run's config.yaml: at once for a new run, and for a
        resume only once its checkpoint has verified and loaded, so that a refused resume leaves the
        folder as it found it (the lock file aside)."""
        if self.lock is not None:
            _write_status(self.out, "running")
            write_atomic(self.out / "config.yaml", self.config_yaml)

    def finished(self, step: int) -> None:
        if self.lock is not None:
            _write_status(self.out, "finished", step)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _write_status(out: Path, status: str, step: int | None = None) -> None:
    from fasttune.version import __version__

    record = {
        "fasttune": __version__,
        "status": status,
        "step": step,
        "pid": os.getpid(),
        "time": time.time(),
    }
    write_atomic(out / MARKER, json.dumps(record) + "\n")


def _clear_outputs(out: Path) -> list[str]:
    removed = []
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _refuse_foreign(out: Path, force: bool) -> None:
    """Before anything is written: a non-empty folder that is not ours needs `force`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunFolderError(f"output_dir {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or is_run_folder(out):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    if not force:
        raise RunFolderError(
            f"output_dir {out} is not empty ({shown}) and is not a fasttune run folder: choose a new or "
            "empty folder, or pass --force (train.run(..., force=True)) to write into it anyway"
        )
    print(f"--force: writing into {out}, which is not a fasttune run folder (it holds {shown})", flush=True)


def _check_fresh_start(out: Path, force: bool, ours: bool) -> None:
    """A run without --resume, in a folder it has locked. Only a run's own folder is ever cleared."""
    if not ours:
        return
    done = finished_because(out)
    latest, _ = find_latest(out)
    if force:
        removed = _clear_outputs(out)
        if removed:
            print(f"--force: starting over in {out}; removed {', '.join(removed)}", flush=True)
        return
    if done:
        raise RunFolderError(
            f"output_dir {out} holds a finished run ({done}): choose a new output_dir, extend this run with "
            "--resume and a larger max_steps or epochs, or pass --force to start over in it (its outputs "
            "are removed)"
        )
    if latest is not None:
        raise RunFolderError(
            f"output_dir {out} holds an unfinished run with a checkpoint ({latest.name}): continue it with "
            "--resume, choose a new output_dir, or pass --force to start over in it (its checkpoints are "
            "removed)"
        )
    removed = _clear_outputs(out)  # nothing to resume: an earlier start died before its first checkpoint
    if removed:
        print(f"{out}: the run there stopped before its first checkpoint; starting over", flush=True)


def _check_resume(cfg: RunConfig, out: Path, allow_config_change: bool) -> ConfigChanges:
    latest, why = find_latest(out)
    if latest is None:
        raise RunFolderError(f"--resume: {why}; start the run without --resume")
    saved = _sniff_yaml(out / "config.yaml")
    if saved is None:  # the checkpoint carries the config it was trained with
        try:
            saved = json.loads((latest / "meta.json").read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError):
            saved = None
    if not isinstance(saved, dict):
        if not allow_config_change:
            raise RunFolderError(
                f"--resume: {out} has no readable config.yaml to compare the new config with; pass "
                "--allow-config-change to resume with the new one anyway"
            )
        return ConfigChanges()
    changes = compare_configs(saved, cfg.to_dict())
    if changes.trajectory and not allow_config_change:
        raise RunFolderError(
            f"--resume: the config differs from {out / 'config.yaml'} in keys that change the training "
            f"trajectory: {changes.describe(changes.trajectory)}. Resume with the saved values, or pass "
            "--allow-config-change (train.run(..., allow_config_change=True)) to continue with the new ones"
        )
    for line in changes.report_lines(allowed=allow_config_change):
        print(line, flush=True)
    return changes


def _claim_main(cfg, resume: bool, force: bool, allow_config_change: bool) -> RunFolder:
    if resume and force:
        raise RunFolderError("--resume continues a run and --force starts one over: choose one")
    out = check_location(cfg)
    ours = out.is_dir() and is_run_folder(out)  # before the lock file makes any folder look like ours
    if not resume:
        _refuse_foreign(out, force)
    elif not out.is_dir():
        raise RunFolderError(f"--resume: {out} does not exist; start the run without --resume")
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    try:
        changes = _check_resume(cfg, out, allow_config_change) if resume else None
        if not resume:
            _check_fresh_start(out, force, ours)
        folder = RunFolder(out, lock, changes, cfg.to_yaml())
        if not resume:
            folder.start()  # only now: the checks above passed (a resume starts once its checkpoint loads)
    except BaseException:
        lock.release()
        raise
    return folder


@contextlib.contextmanager
def claim(cfg: RunConfig, env: Dist, *, resume: bool, force: bool = False, allow_config_change: bool = False):
    """The folder for this run, checked and locked by rank 0 for as long as the block runs. Every rank
    learns from one all-reduce whether rank 0 refused, so no rank waits at a barrier for one that quit."""
    folder, error = RunFolder(Path(cfg.output_dir)), None
    if env.is_main:
        try:
            folder = _claim_main(cfg, resume, force, allow_config_change)
        except FasttuneError as e:
            error = e
        except OSError as e:  # a folder that cannot be created, read or locked
            error = RunFolderError(f"output_dir {cfg.output_dir}: {e.strerror or e} ({e.filename or ''})")
    if distributed.agree_any(error is not None):
        if error is not None:
            raise error
        raise RunFolderError(f"rank 0 refused output_dir {cfg.output_dir} (its message says why)")
    folder.reapply = distributed.agree_any(folder.reapply)  # the same optimizer settings on every rank
    try:
        yield folder
    finally:
        folder.release()


def saved_budget(out: Path, cfg: RunConfig) -> int | None:
    """The packing budget of the checkpoint a resume starts from, when the batch keys are unchanged (a
    resume must pack the same bins to continue the same trajectory); None otherwise. Checkpoints from
    before the budget was recorded packed `micro_batch_tokens` per micro-batch."""
    latest, _ = find_latest(out)
    if latest is None:
        return None
    try:
        meta = json.loads((latest / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    old = meta.get("config") or {}
    keys = ("micro_batch_tokens", "tokens_per_step")
    if (
        any(old.get(k) != getattr(cfg, k) for k in keys)
        or (old.get("data") or {}).get("max_seq_len") != cfg.data.max_seq_len
    ):
        return None
    return int(meta.get("micro_batch_budget") or cfg.micro_batch_tokens)
