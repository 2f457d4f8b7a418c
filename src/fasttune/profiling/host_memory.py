"""This process's resident memory, from /proc/self/status (Linux): now (VmRSS) and its high-water mark
(VmHWM), which `reset_peak` brings back down to the current RSS (`echo 5 > /proc/self/clear_refs`). Used
by `benchmarks/memory/host_memory.py` and the tests that hold a run to the planner's host prediction."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _field(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return _field("VmRSS")


def peak_rss_bytes() -> int | None:
    return _field("VmHWM")


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
