"""The regression gate (fasttune.bench.gate, which benchmarks/e2e/gate.py checks against its
thresholds.json): its check names what regressed, and turning packing off makes it fail. CI runs the whole
gate itself (`.ci/run`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fasttune.bench import gate

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "e2e" / "gate.py"
THRESHOLDS = SCRIPT.with_name("thresholds.json")


def test_check_names_the_counter_the_value_and_the_bound():
    measured = {"fasttune_token_efficiency": 0.5, "bucket": 1792, "speed_ratio_vs_hf": 1.2}
    thresholds = {
        "fasttune_token_efficiency_min": 0.84,
        "bucket_max": 1792,
        "speed_ratio_vs_hf_min": 0.6,
        "graph_breaks_max": 6,
    }
    assert gate.check(measured, thresholds) == ["fasttune_token_efficiency = 0.5 is below its min 0.84"]


@pytest.fixture(scope="module")
def measured():
    return {regress: gate.measure(regress, compile_counters=False) for regress in (None, "no_packing")}


def test_the_gate_passes_as_it_stands(measured):
    stored = json.loads(THRESHOLDS.read_text())["cpu"]
    assert gate.check(measured[None], stored) == []
    assert measured[None]["final_loss_gap"] < 1e-3  # the same steps learn the same thing


def test_turning_packing_off_fails_the_gate(measured):
    stored = json.loads(THRESHOLDS.read_text())["cpu"]
    failures = gate.check(measured["no_packing"], stored)
    assert any(f.startswith("fasttune_token_efficiency = ") and "below its min" in f for f in failures)


def test_the_script_runs_from_the_package_without_path_edits():
    """CI's `python benchmarks/e2e/gate.py` imports the gate from the installed fasttune."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--regress" in out.stdout
