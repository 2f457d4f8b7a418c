"""Issue 14, items 16-18: host memory of a run bounded by the planner's prediction, one LoRA merge path
(fp32, saved in the dtype the folder declares), and the defaults of `fasttune profile --op` and `eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import fasttune
from fasttune.data import corpus, synth
from fasttune.data.records import write_jsonl
from fasttune.train.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fasttune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _run_config(setup, out, *overrides):
    return load_config(
        None,
        [
            f"model={setup / 'model'}",
            f"data.files=[{setup / 'data.jsonl'}]",
            f"output_dir={out}",
            "device=cpu",
            "micro_batch_tokens=512",
            "max_seq_len=512",
            "data.system_prompt=none",
            "eval_every=1000",
            "save_every=1000",
            "samples=0",
            "eval_examples=0",
            *overrides,
        ],
    )


# ----------------------------------------------------------------------------------------------------------
# Item 17: one merge path


def test_item17_run_merged_folder_is_base_plus_adapter_in_fp32(setup, tmp_path):
    """precision=bf16 trains the LoRA against a bf16 copy of the fp32 base; the merged folder must still be
    the fp32 base + s B A (as `fasttune export --format merged` makes it), not that bf16 copy + s B A."""
    from fasttune.models.lora import load_adapter
    from fasttune.train import loop as train

    cfg = _run_config(
        setup, tmp_path, "max_steps=3", "method=lora", "lora.merge=true", "lr=1e-2", "precision=bf16"
    )
    train.run(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77]])
    expected_model = fasttune.load_model(setup / "model", dtype=torch.float32, kernels="torch")
    base_logits = expected_model.logits(ids)
    load_adapter(expected_model, tmp_path / "adapter")
    merged = fasttune.load_model(tmp_path / "merged", kernels="torch")
    with torch.no_grad():
        expected = expected_model.logits(ids)
        got = merged.logits(ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    declared = json.loads((tmp_path / "merged" / "config.json").read_text())
    declared_dtype = declared.get("dtype") or declared.get("torch_dtype")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert declared_dtype == "float32" and dtypes == {"F32"}

    # The same adapter through `fasttune export --format merged`: the same tensors.
    exported = _cli(
        "export",
        "--model",
        setup / "model",
        "--adapter",
        tmp_path / "adapter",
        "--format",
        "merged",
        "--out",
        tmp_path / "exported",
    )
    assert exported.returncode == 0, exported.stderr
    with (
        safe_open(tmp_path / "merged" / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "exported" / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


# ----------------------------------------------------------------------------------------------------------
# Item 18: the interpreter set up by `profile --op`, and `eval`'s default number of generations


def test_item18_profile_op_on_the_cpu_sets_up_the_interpreter_itself():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = _cli("profile", "--op", "rms_norm", "--shape", "8x16", "--reps", "1", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "rms_norm" in r.stdout and "8x16" in r.stdout and "triton" in r.stdout
    assert "TRITON_INTERPRET=1" in r.stdout + r.stderr  # it says what it set up


def test_item18_profile_op_refuses_an_interpreter_turned_off_on_the_cpu():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = _cli("profile", "--op", "rms_norm", "--shape", "8x16", "--reps", "1", "--device", "cpu", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fasttune: error:") and "TRITON_INTERPRET=0" in r.stderr


@pytest.fixture(scope="module")
def big_test_split(tmp_path_factory, setup):
    """A prepared data folder whose test split has more than the default number of generations."""
    from fasttune.models.tokenizer import load_tokenizer
    from fasttune.train.config import EVAL_EXAMPLES

    root = tmp_path_factory.mktemp("evalsplit")
    write_jsonl(root / "corpus.jsonl", synth.generate(EVAL_EXAMPLES + 40, seed=11))
    opts = corpus.PrepareOptions(ratios=(0.02, 0.02, 0.96), stratify_key=None)
    corpus.prepare([str(root / "corpus.jsonl")], root / "data", load_tokenizer(setup / "model"), opts)
    n_test = sum(1 for _ in open(root / "data" / "test.jsonl"))
    assert n_test > EVAL_EXAMPLES
    return root / "data", n_test


def test_item18_eval_generates_for_the_runs_default_number_of_prompts(setup, big_test_split, tmp_path):
    from fasttune.train.config import EVAL_EXAMPLES, RunConfig

    assert RunConfig().eval_examples == EVAL_EXAMPLES == 200  # one constant for the run and the command
    data, n_test = big_test_split
    common = ["eval", "--model", setup / "model", "--data", data, "--device", "cpu", "--max-new-tokens", "1"]
    r = _cli(*common, "--out", tmp_path / "default.json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "default.json").read_text())
    assert report["metrics"]["examples"] == EVAL_EXAMPLES and len(report["generations"]) == EVAL_EXAMPLES
    assert report["examples"] == n_test  # the loss still covers the whole split

    r = _cli(*common, "--all", "--out", tmp_path / "all.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "all.json").read_text())["metrics"]["examples"] == n_test

    r = _cli(*common, "--all", "--max-examples", "3", "--out", tmp_path / "both.json")
    assert r.returncode == 2 and "--all" in r.stderr and "--max-examples" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# Item 16: host memory


@pytest.mark.parametrize("autocast", [False, True])
def test_item16_chunked_loss_equals_the_eager_loss_and_gradients(autocast):
    from fasttune.models.chunked_loss import chunked_cross_entropy

    torch.manual_seed(0)
    T, H, V = 700, 24, 1000
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (1, T))
    targets[0, ::7] = -100
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        got = chunked_cross_entropy(hidden, weight, targets, chunk=64)  # 11 chunks, the last one short
    got.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with ctx:
        logits = torch.nn.functional.linear(hidden, weight).float()
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    want.backward()
    tol = dict(rtol=2e-2, atol=1e-4) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(g_h, hidden.grad, **tol)
    torch.testing.assert_close(g_w, weight.grad, **tol)


_MEASURE = """
import json, sys
from fasttune.train import loop as train
from fasttune.train.config import load_config
from fasttune.profiling.host_memory import peak_rss_bytes
from fasttune.plan.host import host_plan_for_config
cfg = load_config(None, sys.argv[1:])
train.run(cfg)
plan = host_plan_for_config(cfg)
print("HOST " + json.dumps({"peak": peak_rss_bytes(), "plan": plan.peak, "text": plan.describe()}))
"""


def test_item16_cpu_run_host_peak_is_within_1_3x_of_the_planned(setup, tmp_path):
    """A scaled-down large-vocabulary model (V = 65,536, as the [T, V] logits dominate Qwen2.5-0.5B's CPU
    step) at 1,024-token micro-batches: the run's measured high-water mark of RSS (VmHWM, the child
    process's whole life) is at most 1.3x what the planner predicts for the host, and not far below it."""
    from fasttune.profiling.host_memory import peak_rss_bytes
    from helpers import hf_model

    if peak_rss_bytes() is None:
        pytest.skip("no /proc/self/status VmHWM here")
    model_dir = tmp_path / "model"
    hf_model("qwen2_tied", vocab_size=65536).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).write_bytes((setup / "model" / f).read_bytes())
    args = [
        f"model={model_dir}",
        f"data.files=[{setup / 'data.jsonl'}]",
        f"output_dir={tmp_path / 'out'}",
        "device=cpu",
        "micro_batch_tokens=1024",
        "max_seq_len=512",
        "max_steps=2",
        "eval_every=1000",
        "save_every=1000",
        "samples=0",
        "eval_examples=0",
        "data.system_prompt=none",
    ]
    r = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("HOST ", 1)[1])
    assert got["plan"] < 1.5 * 2**30, got  # the test stays far from the machine's limit
    assert got["peak"] <= 1.3 * got["plan"], got
    assert got["peak"] >= 0.5 * got["plan"], got  # the prediction is not padded into meaninglessness


def test_item16_dry_run_prints_the_host_plan(setup, capsys):
    from fasttune.cli.main import main

    assert main(["run", "--dry-run", f"model={setup / 'model'}", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "host memory of a run on cpu:" in out and "GiB peak (load" in out and "end of run" in out
