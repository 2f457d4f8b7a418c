"""`fasttune bench` end to end on the CPU with a tiny checkpoint: every variant trains the same steps,
and the JSON, the markdown table and the loss plot are written with consistent ratios."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks" / "e2e"))

import bench  # noqa: E402
import gate  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model_dir, _, _ = gate.workload(root)
    stem = root / "out" / "tiny"
    assert (
        bench.main(
            [
                "--model",
                str(model_dir),
                "--tokens",
                "12000",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--warmup",
                "1",
                "--out",
                str(stem),
                "--variants",
                "hf_padded",
                "hf_padding_free",
                "fasttune_torch",
                "fasttune_lora",
            ]
        )
        == 0
    )
    return stem, json.loads(stem.with_suffix(".json").read_text())


def test_bench_writes_json_table_and_plot(report):
    stem, r = report
    assert set(r["results"]) == {"hf_padded", "hf_padding_free", "fasttune_lora_torch", "fasttune_torch"}
    assert r["gpu"].startswith("cpu") and r["steps"] >= 3 and r["bucket"] % 256 == 0
    table = stem.with_suffix(".md").read_text()
    assert "| hf_padded |" in table and "| fasttune_torch |" in table
    assert stem.with_suffix(".png").stat().st_size > 1000


def test_same_steps_same_losses_and_consistent_ratios(report):
    _, r = report
    losses = r["losses"]
    assert len({len(v) for v in losses.values()}) == 1  # every variant trained the same steps
    for a, b in zip(losses["hf_padded"], losses["fasttune_torch"], strict=True):
        assert abs(a - b) < 1e-3 * abs(a)  # the same model on the same examples (fp32): the same curve
    for row in r["results"].values():
        assert row["vs_a"] == pytest.approx(
            row["target_tokens_per_s"] / r["results"]["hf_padded"]["target_tokens_per_s"]
        )
    assert r["results"]["hf_padded"]["vs_a"] == pytest.approx(1.0)
    assert r["results"]["fasttune_torch"]["token_efficiency"] > r["results"]["hf_padded"]["token_efficiency"]


def test_fasttune_bench_command_reaches_the_benchmark(capsys):
    from fasttune.cli.main import main

    assert main(["bench", "--help"]) == 0
    assert "--variants" in capsys.readouterr().out
