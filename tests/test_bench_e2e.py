"""`fasttune bench` end to end on the CPU with a tiny checkpoint: every variant trains the same steps,
and the JSON, the markdown table and the loss plot are written with consistent ratios."""

import json
import subprocess
import sys

import pytest

from fasttune.bench import cli as bench
from fasttune.bench.workloads import tiny_workload


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model_dir, _, _ = tiny_workload(root)
    stem = root / "out" / "cpu" / "e2e" / model_dir.name  # --results's <gpu>/e2e/<model folder's name>
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
                "--results",
                str(root / "out"),
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


def test_the_bench_parser_loads_no_torch():
    """`fasttune bench --help` answers without importing torch: the runners load after parsing."""
    code = (
        "import sys, fasttune.bench.cli as c; assert c.main(['--help']) == 0 and 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--results" in out.stdout


def test_a_tiny_cpu_run_writes_into_the_results_folder_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--variants", "fasttune_torch"]
    assert bench.main([*argv, "--tokens", "4000", "--warmup", "1"]) == 0
    r = json.loads((tmp_path / "fasttune-bench" / "cpu" / "e2e" / "tiny.json").read_text())
    assert list(r["results"]) == ["fasttune_torch"] and r["model"] == "tiny" and r["steps"] >= 2
    assert r["results"]["fasttune_torch"]["steps_measured"] == r["steps"] - 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "no-such-model"],
            "--model no-such-model: not a model folder, 'tiny' nor a named",
        ),
        (["--model", "tiny", "--tokens", "0"], "bench: --tokens must be >= 1"),
        (["--model", "tiny", "--data", "missing.jsonl"], "bench: --data missing.jsonl: no such file"),
        (
            ["--model", "tiny", "--device", "cpu", "--tokens", "10"],
            "plan 1 step(s) of 32 examples, no more than --warmup 5",
        ),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, tmp_path, capsys):
    from fasttune.cli.main import main

    assert main(["bench", *argv, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttune: error: ") and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written
