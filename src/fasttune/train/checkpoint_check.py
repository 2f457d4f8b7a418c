"""What a resume checks before it trusts a checkpoint folder, and the one-line errors of a failed write.

Digests: every file of a checkpoint but meta.json (the safetensors files of state/, one per writing rank,
and each rank's rng-<rank>.safetensors) is recorded in meta.json as {"bytes", "sha256"}. Each rank digests
the files it wrote (a file's owner is read from its name: `rng-00003` and `state/shard-00004-...` belong to
rank 3), the digests are gathered to rank 0 with one all-reduce, and rank 0 writes them into meta.json,
which is written last. A resume checks sizes and digests before any tensor is read, each rank the files
it owns under the new world size, and all ranks agree on the verdict (one all-reduce) so that every rank
stops, or none.

meta.json itself is cross-checked: its step against the folder's name and the scheduler's step count, the
sampler position, optimizer groups, Python RNG state and the loop's counters against the types and sizes
the resume needs, so that a hand-edited or damaged meta.json is one error naming the key, not a
KeyError, and never a resume that silently mixes the state of two steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import torch

from fasttune.errors import CheckpointError
from fasttune.train.distributed import SINGLE, Dist, agree_any, all_reduce_sum

log = logging.getLogger("fasttune")
NAME = re.compile(r"step-(\d{8})")
_OWNER = re.compile(r"(?:rng-(\d+)\.safetensors|state/shard-(\d+)-.*)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20  # 1 MiB reads: the digest streams through a fixed buffer, whatever the file's size


def file_digest(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, "sha256": h.hexdigest()}


def owner(name: str, world_size: int) -> int:
    """The rank that digests (on save) or verifies (on resume) a checkpoint file: its writer where the name
    says which rank that was (torch's sharded writer numbers its files by rank + 1), else rank 0."""
    m = _OWNER.fullmatch(name)
    if m is None:
        return 0
    rank = int(m[1]) if m[1] is not None else int(m[2]) - 1
    return rank % world_size


def files_of(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but meta.json, by path relative to it, sorted."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p != folder / "meta.json"
    )


def _gather_json(obj, dist: Dist) -> list:
    """Every rank's JSON-able `obj`, on every rank, by sums: each rank fills its own row of a zero tensor
    (no pickle, unlike torch's gather_object)."""
    data = json.dumps(obj).encode()
    sizes = torch.zeros(dist.world_size, dtype=torch.int64)
    sizes[dist.rank] = len(data)
    all_reduce_sum(sizes)
    rows = torch.zeros(dist.world_size, int(sizes.max()), dtype=torch.int32)
    rows[dist.rank, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)
    all_reduce_sum(rows)
    return [json.loads(bytes(rows[r, : sizes[r]].to(torch.uint8).tolist())) for r in range(dist.world_size)]


def record_digests(folder: Path, dist: Dist = SINGLE) -> dict:
    """Called by every rank once all have written their files; returns {file: digest} on rank 0 (rank 0
    also digests any file no rank claimed), {} on the others."""
    names = files_of(folder)
    mine = {n: file_digest(folder / n) for n in names if owner(n, dist.world_size) == dist.rank}
    if not dist.enabled:
        return mine
    merged = {k: v for part in _gather_json(mine, dist) for k, v in part.items()}
    if not dist.is_main:
        return {}
    for n in names:
        if n not in merged:
            merged[n] = file_digest(folder / n)
    return dict(sorted(merged.items()))


# ----------------------------------------------------------------------------------------------------------
# meta.json


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder}/meta.json is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}/meta.json is not a JSON object")
    return meta


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _get(meta: dict, key: str, folder: Path):
    node = meta
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CheckpointError(f"checkpoint {folder}/meta.json: {key} is missing")
        node = node[part]
    return node


def _need_count(meta: dict, key: str, folder: Path) -> int:
    value = _get(meta, key, folder)
    if not _count(value):
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: {key} must be a non-negative integer, got {value!r}"
        )
    return value


def _need_number(value, key: str, folder: Path, finite: bool = True) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or (finite and not math.isfinite(value)) or math.isnan(value):
        raise CheckpointError(f"checkpoint {folder}/meta.json: {key} must be a number, got {value!r}")


def check_meta(folder: Path, meta: dict, n_groups: int | None) -> None:
    """Everything a resume takes from meta.json, against the folder and itself: one error naming the key.
    `n_groups` is the optimizer's number of parameter groups (None: not checked)."""
    step = _need_count(meta, "step", folder)
    m = NAME.fullmatch(folder.name)
    if m is not None and int(m[1]) != step:
        raise CheckpointError(
            f"checkpoint {folder}: meta.json says step {step} but its folder is {folder.name}"
        )
    if _need_count(meta, "world_size", folder) < 1:
        raise CheckpointError(f"checkpoint {folder}/meta.json: world_size must be at least 1")
    last = _need_count(meta, "scheduler.last_epoch", folder)
    if last != step:  # LambdaLR counts every step, skipped ones included, as the loop's step does
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: scheduler.last_epoch is {last} "
            f"but the checkpoint is of step {step}"
        )
    groups = _get(meta, "optimizer.param_groups", folder)
    base_lrs = _get(meta, "scheduler.base_lrs", folder)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: optimizer.param_groups must be a list of objects"
        )
    if n_groups is not None and len(groups) != n_groups:
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: optimizer.param_groups has {len(groups)} group(s), "
            f"the optimizer has {n_groups}"
        )
    if not isinstance(base_lrs, list) or len(base_lrs) != len(groups):
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: scheduler.base_lrs must list one rate per optimizer group"
        )
    for i, g in enumerate(groups):
        for k in ("lr", "eps", "weight_decay"):
            if k in g:
                _need_number(g[k], f"optimizer.param_groups[{i}].{k}", folder)
    for i, lr in enumerate(base_lrs):
        _need_number(lr, f"scheduler.base_lrs[{i}]", folder)
    for key in ("sampler.epoch", "sampler.position", "bad_evals", "skips"):
        _need_count(meta, key, folder)
    seed = _get(meta, "sampler.seed", folder)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CheckpointError(f"checkpoint {folder}/meta.json: sampler.seed must be an integer, got {seed!r}")
    if meta["skips"] > step:
        raise CheckpointError(f"checkpoint {folder}/meta.json: skips {meta['skips']} exceeds the step {step}")
    _need_number(_get(meta, "best_val", folder), "best_val", folder, finite=False)  # inf before any eval
    try:
        version, internal, gauss = _get(meta, "python_rng", folder)
        random.Random().setstate((version, tuple(internal), gauss))  # validates without touching ours
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {folder}/meta.json: python_rng is not a Python random state ({e})"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# The files against their digests


def _advice(folder: Path) -> str:
    return (
        f"; move {folder} out of {folder.parent} and --resume takes the newest complete checkpoint left "
        "(nothing was changed)"
    )


def _digest_problems(folder: Path, files, dist: Dist) -> list[str]:
    if not isinstance(files, dict):
        return [f"checkpoint {folder}/meta.json: files must map each file to its digest"]
    problems = []
    for name in sorted(files):
        record = files[name]
        path = folder / name
        if name.startswith("/") or ".." in Path(name).parts or name == "meta.json":
            problems.append(
                f"checkpoint {folder}/meta.json: files names {name!r}, not a file of the checkpoint"
            )
            continue
        if not (
            isinstance(record, dict)
            and _count(record.get("bytes"))
            and _HEX64.fullmatch(str(record.get("sha256")))
        ):
            problems.append(f"checkpoint {folder}/meta.json: files.{name} must be {{bytes, sha256}}")
            continue
        if owner(name, dist.world_size) != dist.rank:
            continue
        if not path.is_file():
            problems.append(f"checkpoint {path} is missing (meta.json lists it)")
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "corrupted (size mismatch)"
            problems.append(
                f"checkpoint {path} is {what} ({size} bytes, meta.json records {record['bytes']})"
            )
        elif file_digest(path)["sha256"] != record["sha256"]:
            problems.append(
                f"checkpoint {path} is corrupted (sha256 mismatch): its bytes changed after it was written"
            )
    if dist.is_main:
        problems += [
            f"checkpoint {folder / n} is not recorded in meta.json (a file added after the checkpoint)"
            for n in files_of(folder)
            if n not in files
        ]
    return problems


def _header_problems(folder: Path, dist: Dist) -> list[str]:
    """Every state file this rank owns has a safetensors header that fits the file: checks a checkpoint
    without digests (an older fasttune) as far as it can be checked, in a clear error, not a raw
    SafetensorError out of torch's reader."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for p in sorted((folder / "state").glob("*.safetensors")):
        if owner(str(p.relative_to(folder)), dist.world_size) != dist.rank:
            continue
        try:
            with safe_open(str(p), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            problems.append(f"checkpoint {p} is truncated or damaged ({e})")
    return problems


def problems(folder: Path, meta: dict, dist: Dist = SINGLE) -> list[str]:
    """What is wrong with this rank's share of the checkpoint's files (all of them in one process)."""
    found = []
    files = meta.get("files")
    if files is None:
        log.warning("checkpoint %s records no digests (written by an older fasttune): not verified", folder)
    else:
        found += _digest_problems(folder, files, dist)
    rng = folder / f"rng-{dist.rank:05d}.safetensors"
    if dist.rank < meta.get("world_size", 1) and not rng.is_file() and not any(str(rng) in p for p in found):
        found.append(
            f"checkpoint {rng} is missing (rank {dist.rank}'s random state; the run cannot go on "
            "with the random streams of the uninterrupted run)"
        )
    return found or _header_problems(folder, dist)


def verify(folder: Path, meta: dict, dist: Dist = SINGLE) -> None:
    """Raise one CheckpointError on every rank if any rank found a problem (a collective)."""
    found = problems(folder, meta, dist)
    if agree_any(bool(found)):
        first = (
            found[0]
            if found
            else f"checkpoint {folder} failed verification on another rank (its error names the file)"
        )
        raise CheckpointError(first + _advice(folder))


def check_adam_steps(folder: Path, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """AdamW's per-parameter step counts, just read from state/, against meta.json: every optimizer step
    counts once, a skipped non-finite step not at all."""
    expected = meta["step"] - meta["skips"]
    counts = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if counts and counts != {float(expected)}:
        found = ", ".join(f"{c:g}" for c in sorted(counts))
        raise CheckpointError(
            f"checkpoint {folder}: AdamW's step count is {found} in state/, meta.json's step {meta['step']} "
            f"less skips {meta['skips']} makes {expected}"
        )


# ----------------------------------------------------------------------------------------------------------
# A failed write


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _os_errors(e: BaseException) -> list[OSError]:
    """The OSErrors behind a failed write: the error itself, or those of every rank inside torch's
    CheckpointException (a BaseException, whose `failures` maps rank -> (exception, traceback))."""
    if isinstance(e, OSError):
        return [e]
    found = []
    for exc, _trace in getattr(e, "failures", {}).values():
        found += _os_errors(exc)
    return found


def write_failure(e: BaseException, root: Path, final: Path, previous: Path | None) -> CheckpointError | None:
    """One line for an operating-system error while writing checkpoint `final`, naming the path and, for a
    full disk, the free space and what the previous checkpoint takes; None for anything else (a bug, or an
    error with no errno, which did not come from the operating system)."""
    causes = [c for c in _os_errors(e) if c.errno is not None]
    if not causes:
        return None
    c = next((c for c in causes if c.errno in (errno.ENOSPC, errno.EDQUOT)), causes[0])
    kept = (
        f"the previous checkpoint {previous} is kept"
        if previous is not None
        else "there is no earlier checkpoint"
    )
    if c.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(root).free
        need = f" (the previous one takes {_size(_folder_bytes(previous))})" if previous is not None else ""
        what = "no space left on device" if c.errno == errno.ENOSPC else "disk quota exceeded"
        return CheckpointError(
            f"{what} writing checkpoint {final}: {_size(free)} free on {root}{need}; {kept}. Free some "
            "space (or set output_dir elsewhere) and resume with --resume"
        )
    where = f" ({c.filename})" if c.filename else ""
    return CheckpointError(f"cannot write checkpoint {final}: {c.strerror or c}{where}; {kept}")
