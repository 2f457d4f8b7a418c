"""Helpers that tests import by name (`from helpers import ...`); fixtures stay in conftest.py.

Processes started by a test never share an output stream as the channel for what the test asserts: two
ranks printing at once into one pipe interleave mid-line (CI saw `'rank 0: True Falserank 1: True
False'`). Each rank's output goes to a file of its own, through torchrun's own log directory
(`--log-dir` and `--tee`, which torchrun also reads from the `PET_LOG_DIR` and `PET_TEE` environment
variables, so a nested `fasttune run --nproc N` honours them), or the rank writes its result file itself.
Rendezvous ports come from the OS (`--standalone` binds port 0), never from a fixed number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def torchrun_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for a test's torchrun launch: one intra-op thread per process (two processes on
    two cores), and every rank's stdout and stderr teed into a file of its own under `log_dir`."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)  # `import helpers`
    env = {"OMP_NUM_THREADS": "1", "PET_LOG_DIR": str(log_dir), "PET_TEE": "3", "PYTHONPATH": path}
    return {**os.environ, **env, **extra}


def rank_logs(log_dir: Path, stream: str = "stdout") -> dict[int, str]:
    """Each local rank's `stream` ("stdout" or "stderr") as torchrun wrote it: `log_dir/<run
    id>/attempt_<k>/<rank>/<stream>.log`. With several launches into one folder (a run and its resume),
    give each launch its own `log_dir`; an ambiguous folder is an error rather than a guess."""
    runs = [p for p in Path(log_dir).iterdir() if p.is_dir()] if Path(log_dir).is_dir() else []
    if len(runs) != 1:
        raise AssertionError(f"expected one torchrun log folder in {log_dir}, found {len(runs)}")
    attempts = sorted(runs[0].glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    if not attempts:
        raise AssertionError(f"no attempt folder in {runs[0]}")
    return {
        int(d.name): (d / f"{stream}.log").read_text(errors="replace")
        for d in attempts[-1].iterdir()
        if d.is_dir() and d.name.isdigit()
    }


def torchrun(
    script: Path, log_dir: Path, nproc: int = 2, args=(), env=None, timeout: float = 300
) -> dict[int, str]:
    """Run `script ARGS` on `nproc` local ranks (gloo on the CPU) and return each rank's stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(script), *args]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=torchrun_env(log_dir, **(env or {}))
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return rank_logs(log_dir)


def write_rank_result(folder: Path, rank: int, result) -> None:
    """A rank's result as JSON in a file of its own, written under a temporary name and renamed, so the
    reader never sees half a file (the test imports this module inside the rank's script)."""
    folder = Path(folder)
    tmp = folder / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, folder / f"rank-{rank}.json")


def read_rank_results(folder: Path, nproc: int) -> list:
    """Every rank's result, in rank order; a missing one is an error naming it."""
    out = []
    for rank in range(nproc):
        path = Path(folder) / f"rank-{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no result ({path})"
        out.append(json.loads(path.read_text()))
    return out
