"""Every benchmark script runs (`--smoke`: tiny CPU shapes, Triton through its interpreter, nothing
measured), so that the scripts a GPU session runs are known to work before it starts."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks" / "ops").glob("bench_*.py"))


def test_there_is_a_benchmark_per_op():
    ops = sorted(
        p.stem
        for p in (Path(__file__).parent.parent / "src" / "fasttune" / "ops").glob("*.py")
        if not p.stem.startswith("_") and p.stem != "timing"  # timing.py times the ops; it is not one
    )
    assert [p.stem.removeprefix("bench_") for p in SCRIPTS] == ops


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_smoke(script):
    out = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "error" not in out.stdout.lower(), out.stdout[-2000:]
    assert "fasttune" in out.stdout and "eager" in out.stdout
