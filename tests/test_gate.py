"""The regression gate (benchmarks/e2e/gate.py): its check names what regressed, and turning packing off
makes it fail. CI runs the whole gate itself (`.ci/run`)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks" / "e2e"))

import gate  # noqa: E402


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
    stored = gate.json.loads(gate.THRESHOLDS.read_text())["cpu"]
    assert gate.check(measured[None], stored) == []
    assert measured[None]["final_loss_gap"] < 1e-3  # the same steps learn the same thing


def test_turning_packing_off_fails_the_gate(measured):
    stored = gate.json.loads(gate.THRESHOLDS.read_text())["cpu"]
    failures = gate.check(measured["no_packing"], stored)
    assert any(f.startswith("fasttune_token_efficiency = ") and "below its min" in f for f in failures)
