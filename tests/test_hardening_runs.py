"""Issue 14, runs and config (items 10, 12, 13, 14, 15): config values inside finite ranges, the output
folder's ownership and lock, a second run into a finished or running folder, resume with a changed config,
and the global batch under N processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial

import pytest

from fasttune.cli.main import main
from fasttune.errors import ConfigError, FasttuneError
from fasttune.train import loop as train
from fasttune.train.config import RunConfig, load_config, validate
from fasttune.train.config_diff import compare_configs
from fasttune.train.distributed import split_global_batch
from fasttune.train.run_folder import LOCK, RunFolderError
from helpers import tiny_run_overrides

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


overrides = partial(
    tiny_run_overrides, warmup=0.1, eval_every=1000, save_every=1000, samples=0, eval_examples=0, max_steps=3
)


def config(setup, out, *extra):
    return load_config(None, overrides(setup, out, *extra))


def logged(out, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder):
    """Every file under `folder` with its bytes (the lock file's pid aside): what a refusal must not touch."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def cli(*args):
    """`fasttune ...` in a subprocess: exit status and stderr."""
    p = subprocess.run(
        [sys.executable, "-m", "fasttune.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return p.returncode, p.stderr


def stop_at(n):
    def on_step(step, record):
        if step == n:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


@pytest.fixture(scope="module")
def stopped(setup, tmp_path_factory):
    """A run of 4 steps stopped by SIGTERM after step 2: a checkpoint, no export."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = train.run(config(setup, out, "max_steps=4"), on_step=stop_at(2))
    assert result.stopped == "signal" and (out / "checkpoints" / "step-00000002").is_dir()
    return out


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train.run(config(setup, out))
    assert (out / "model").is_dir()
    return out


# ----------------------------------------------------------------------------------------------------------
# 14. Bounds


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=.inf", r"optim.lr must be a finite number in \(0, 1\], got inf"),
        ("lr=1e308", r"optim.lr must be a finite number in \(0, 1\], got 1e\+308"),
        ("lr=.nan", "optim.lr must be"),
        (
            "max_steps=100000000000000000000000000000",
            r"max_steps must be a finite number in \[1, 1000000000\]",
        ),
        (
            "micro_batch_tokens=10000000000000000",
            r"micro_batch_tokens must be a finite number in \[16, 16777216\]",
        ),
        ("epochs=1e300", r"epochs must be a finite number in \(0, 10000\], got 1e\+300"),
        ("weight_decay=100", r"optim.weight_decay must be a finite number in \[0, 10\]"),
        ("grad_clip=.inf", "optim.grad_clip must be a finite number"),
        ("eps=0", r"optim.eps must be a finite number in \(0, 1\]"),
        ("min_lr_ratio=2", r"optim.min_lr_ratio must be a finite number in \[0, 1\]"),
        ("seed=-1", r"seed must be a finite number in \[0, 4294967295\]"),
        ("eval_every=10000000000", r"eval_every must be a finite number in \[1, 1000000000\]"),
        ("early_stopping=0", r"early_stopping must be a finite number in \[1, 1000000\]"),
        ("lora.alpha=.inf", "lora.alpha must be a finite number"),
        ("synth_n=0", r"data.synth_n must be a finite number in \[1, 10000000\]"),
    ],
)
def test_item14_unbounded_config_values_are_refused_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_item14_list_values_are_bounded_per_item(setup, tmp_path):
    data = str(setup / "data.jsonl")
    with pytest.raises(
        ConfigError, match=r"data.weights\[1\] must be a finite number in \[0, 1000\], got inf"
    ):
        load_config(None, [f"data.files=[{data},{data}]", "data.weights=[1, .inf]"])
    with pytest.raises(ConfigError, match=r"optim.betas"):
        load_config(None, ["betas=[0.9, .nan]"])


def test_item14_the_defaults_the_preset_and_the_shipped_recipes_are_inside_the_bounds(tmp_path):
    validate(RunConfig())
    load_config(None)
    (tmp_path / "config.json").write_text("{}")
    for name in ("qwen2.5-0.5b-full.yaml", "qwen2.5-0.5b-lora.yaml", "qwen2.5-7b-fsdp.yaml"):
        path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
        load_config(path, [f"model={tmp_path}"])


def test_item14_the_cli_prints_one_line_and_starts_nothing(tmp_path):
    code, err = cli("run", "lr=.inf", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and err.strip().splitlines() == [
        "fasttune: error: config: optim.lr must be a finite number in (0, 1], got inf"
    ]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# 13. tokens_per_step is the global batch under N processes


@pytest.mark.parametrize(
    "tokens_per_step, micro, max_len, world, accumulate, budget",
    [
        (None, 4096, 2048, 1, 1, 4096),  # the default run in one process
        (None, 4096, 2048, 2, 1, 2048),  # ... and in two: half-size micro-batches, the same global batch
        (1024, 512, 512, 1, 2, 512),
        (1024, 512, 512, 2, 1, 512),
        (65536, 4096, 2048, 8, 2, 4096),  # configs/qwen2.5-7b-fsdp.yaml on 8 GPUs
        (6144, 4096, 1024, 2, 1, 3072),
    ],
)
def test_item13_the_global_tokens_per_step_are_what_the_config_says_for_any_number_of_processes(
    tokens_per_step, micro, max_len, world, accumulate, budget
):
    layout = split_global_batch(tokens_per_step, micro, max_len, world)
    assert (layout.accumulate, layout.budget, layout.world_size) == (accumulate, budget, world)
    assert layout.global_tokens == (tokens_per_step or micro)
    assert layout.per_step == world * accumulate and layout.budget <= micro


def test_item13_a_split_that_cannot_keep_the_global_batch_is_refused_with_the_numbers():
    with pytest.raises(
        FasttuneError, match=r"cannot be split into 3 process\(es\) x 1 micro-batch.*4095 or 4098"
    ):
        split_global_batch(None, 4096, 1024, 3)
    with pytest.raises(
        FasttuneError, match="micro-batches of 1024 tokens, too short for data.max_seq_len 2048"
    ):
        split_global_batch(None, 4096, 2048, 4)


def test_item13_a_resume_keeps_the_micro_batches_its_checkpoint_packed():
    # written by 2 processes (2 x 2048): 1 process packs the same two bins per step
    layout = split_global_batch(None, 4096, 2048, 1, budget=2048)
    assert (layout.accumulate, layout.budget, layout.global_tokens) == (2, 2048, 4096)
    with pytest.raises(FasttuneError, match=r"packs 1 micro-batch\(es\) of 4096 tokens.*2 process\(es\)"):
        split_global_batch(None, 4096, 2048, 2, budget=4096)


def test_item13_nproc_that_would_change_the_recipe_is_refused_before_launching(tmp_path):
    # the built-in run (4096 tokens per step, sequences up to 2048) cannot be split over 4 processes
    code, err = cli("run", "--nproc", "4", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and "too short for data.max_seq_len 2048" in err and "launching" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_item13_two_processes_keep_the_global_batch_of_one(setup, tmp_path):
    """`fasttune run --nproc 2` on the CPU (gloo): the default tokens_per_step (one micro-batch of 512)
    is shared by the two ranks, so no step holds more than 512 tokens (each rank packs 256)."""
    args = overrides(setup, tmp_path / "two", "max_seq_len=256", "max_steps=3", "log_every=1")
    p = subprocess.run(
        [sys.executable, "-m", "fasttune.cli", "run", "--nproc", "2", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tokens = logged(tmp_path / "two", "tokens")
    assert len(tokens) == 3 and all(0 < t <= 512 for t in tokens), tokens
    assert "2 process(es) x 1 micro-batch(es) of 256 tokens per step" in p.stdout + p.stderr
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["micro_batch_budget"] == 256 and meta["world_size"] == 2


# ----------------------------------------------------------------------------------------------------------
# 12. Output folder ownership and the lock


def test_item12_a_non_empty_folder_that_is_not_a_run_is_refused_untouched(setup, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(
        RunFolderError, match=r"mine is not empty \(notes.txt\) and is not a fasttune run.*--force"
    ):
        train.run(config(setup, out))
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_item12_force_writes_into_it_and_keeps_its_files(setup, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "data" / "mine.txt").write_text("mine")  # a name a run also writes: still not removed
    train.run(config(setup, out), force=True)
    assert "--force: writing into" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model").is_dir()
    assert (out / "data" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["empty", "cwd", "parent_of_cwd", "data", "model"])
def test_item12_output_dir_may_not_be_the_current_folder_or_hold_the_inputs(
    setup, tmp_path, monkeypatch, where
):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub" if where == "parent_of_cwd" else work)
    out = {"empty": "", "cwd": ".", "parent_of_cwd": "..", "data": str(setup), "model": str(setup / "model")}[
        where
    ]
    message = {
        "empty": "output_dir is empty",
        "cwd": "is the current folder or contains it",
        "parent_of_cwd": "is the current folder or contains it",
        "data": "holds the data file",
        "model": "holds the model folder",
    }[where]
    before = snapshot(setup)
    with pytest.raises(RunFolderError, match=message):
        train.run(config(setup, out), force=True)  # not even with --force
    assert snapshot(setup) == before and not list(work.rglob("*.json*"))


def test_item12_a_second_run_into_a_folder_being_written_names_the_holder(setup, tmp_path):
    """While a run writes OUT, `fasttune run` into OUT (another process) gets one line naming the folder
    and the pid holding its lock; the first run goes on unharmed."""
    out = tmp_path / "run"
    seen = {}

    def second_run(step, record):
        if step == 1:
            seen["cli"] = cli("run", *overrides(setup, out, "--force"))
            seen["resume"] = cli("run", *overrides(setup, out), "--resume")

    result = train.run(config(setup, out), on_step=second_run)
    assert result.step == 3 and logged(out, "step") == [1, 2, 3]
    for code, err in seen.values():
        assert code == 2, err
        where = out.resolve()
        assert err.strip().splitlines() == [
            f"fasttune: error: {where} is being written by another fasttune run (pid {os.getpid()}, lock "
            f"{where / LOCK}): wait for it to end or stop it, or choose another output_dir"
        ]


def test_item12_a_killed_run_leaves_no_stale_lock(setup, tmp_path):
    """The kernel drops a flock when its holder dies (here kill -9 while it holds it): the folder resumes."""
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "from fasttune.train import loop as train\n"
        "from fasttune.train.config import load_config\n"
        "def die(step, record):\n"
        "    if step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train.run(load_config(None, {overrides(setup, out, 'save_every=1')!r}), on_step=die)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL and (out / LOCK).is_file()
    result = train.run(config(setup, out, "save_every=1"), resume=True)
    assert result.step == 3 and logged(out, "step") == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# 15. A second run into a finished or unfinished folder


def test_item15_a_second_run_into_a_finished_folder_refuses_and_says_where_to_go(setup, finished):
    before = snapshot(finished)
    code, err = cli("run", *overrides(setup, finished))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{finished} holds a finished run (finished at step 3)" in err
    assert "choose a new output_dir" in err and "--resume" in err and "--force" in err
    assert snapshot(finished) == before  # metrics, model, checkpoints and config.yaml as they were


def test_item15_a_run_folder_from_before_the_marker_counts_as_finished_by_its_export(setup, tmp_path):
    out = tmp_path / "old"
    (out / "model").mkdir(parents=True)
    (out / "config.yaml").write_text(config(setup, out).to_yaml())
    with pytest.raises(RunFolderError, match=r"holds a finished run \(model/ written\)"):
        train.run(config(setup, out))


def test_item15_a_folder_with_a_checkpoint_but_no_export_says_resume(setup, stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = snapshot(out)
    with pytest.raises(
        RunFolderError, match=r"unfinished run with a checkpoint \(step-00000002\): continue it with --resume"
    ):
        train.run(config(setup, out, "max_steps=4"))
    assert snapshot(out) == before
    assert train.run(config(setup, out, "max_steps=4"), resume=True).step == 4


def test_item15_force_starts_over_with_none_of_the_old_run_left(setup, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    train.run(config(setup, out, "max_steps=2", "save_every=1"), force=True)
    assert "--force: starting over in" in capsys.readouterr().out
    assert logged(out, "step") == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-00000001",
        "step-00000002",
    ]
    assert "max_steps: 2" in (out / "config.yaml").read_text()


def test_item15_a_run_that_died_before_its_first_checkpoint_starts_over(setup, tmp_path, capsys):
    out = tmp_path / "run"

    def crash(step, record):
        raise RuntimeError("crash before any checkpoint")

    with pytest.raises(RuntimeError):
        train.run(config(setup, out), on_step=crash)
    assert (out / "metrics.jsonl").is_file() and not (out / "checkpoints").exists()
    result = train.run(config(setup, out))
    assert "stopped before its first checkpoint; starting over" in capsys.readouterr().out
    assert result.step == 3 and logged(out, "step") == [1, 2, 3]


def test_item15_resume_and_force_together_are_refused(setup, stopped):
    with pytest.raises(RunFolderError, match="choose one"):
        train.run(config(setup, stopped), resume=True, force=True)


# ----------------------------------------------------------------------------------------------------------
# 10. Resume with a changed config


def test_item10_changed_trajectory_keys_refuse_to_resume_naming_old_and_new(setup, stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = snapshot(out)
    with pytest.raises(RunFolderError) as e:
        train.run(config(setup, out, "max_steps=4", "lr=2e-3", "seed=1", "weight_decay=0.5"), resume=True)
    message = str(e.value)
    assert "keys that change the training trajectory" in message and "--allow-config-change" in message
    assert "optim.lr 0.001 -> 0.002" in message and "seed 0 -> 1" in message
    assert "optim.weight_decay 0.1 -> 0.5" in message
    assert snapshot(out) == before  # config.yaml is rewritten only after the check passes; nothing is lost


def test_item10_allow_config_change_resumes_with_the_new_values(setup, stopped, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    cfg = config(setup, out, "max_steps=4", "lr=2e-3", "log_every=1")
    result = train.run(cfg, resume=True, allow_config_change=True)
    printed = capsys.readouterr().out
    assert "--allow-config-change: continuing with optim.lr 0.001 -> 0.002" in printed
    assert "other config changes: log_every 25 -> 1" in printed
    assert result.step == 4 and logged(out, "step") == [1, 2, 3, 4]
    # warmup round(0.1 x 4) = 0 steps, then cosine: step 3's lr is 2e-3 x the cosine at 3/4 (the saved
    # optimizer's lr of 1e-3 would give half of it)
    import math

    assert logged(out, "lr")[2] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-9)
    assert "lr: 0.002" in (out / "config.yaml").read_text()


def test_item10_extending_a_run_is_allowed_and_printed(setup, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    result = train.run(config(setup, out, "max_steps=5", "eval_every=2"), resume=True)
    printed = capsys.readouterr().out
    assert "resume: extending the run: max_steps 3 -> 5" in printed
    assert "other config changes: eval_every 1000 -> 2" in printed
    assert result.step == 5 and logged(out, "step") == [1, 2, 3, 4, 5]


def test_item10_a_shorter_run_is_a_trajectory_change(setup, stopped):
    with pytest.raises(RunFolderError, match="max_steps 4 -> 3"):
        train.run(config(setup, stopped, "max_steps=3"), resume=True)


def test_item10_the_comparison_sorts_every_key_by_its_consequence():
    old = RunConfig(method="lora").to_dict()
    new = RunConfig(method="lora").to_dict()
    new.update(
        model="m", micro_batch_tokens=1024, precision="fp32", eval_every=7, save_every=9, strategy="ddp"
    )
    new["optim"].update(lr=1e-4, warmup=0.1, schedule="linear", betas=[0.9, 0.95])
    new["data"].update(files=["x.jsonl"], max_seq_len=512)
    new["lora"].update(targets=["q_proj"], merge=True)
    new["epochs"] = 5.0
    changes = compare_configs(old, new)
    assert sorted(k for k, _, _ in changes.trajectory) == [
        "data.files",
        "data.max_seq_len",
        "lora.targets",
        "micro_batch_tokens",
        "model",
        "optim.betas",
        "optim.lr",
        "optim.schedule",
        "optim.warmup",
        "precision",
    ]
    assert changes.extension == [("epochs", 3.0, 5.0)]
    assert sorted(k for k, _, _ in changes.other) == ["eval_every", "lora.merge", "save_every", "strategy"]
    # a key the saved config lacks (written by an older fasttune) compares as its default
    saved = {k: v for k, v in old.items() if k != "eval_examples"}
    assert compare_configs(saved, old).trajectory == compare_configs(saved, old).other == []
    # the adapters' settings do not matter to a full fine-tune
    full = RunConfig().to_dict()
    changed = {**full, "lora": {**full["lora"], "r": 4}}
    assert compare_configs(full, changed).other == [("lora.r", 16, 4)]


def test_item10_the_cli_flag_reaches_the_run(setup, stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    code, err = cli("run", *overrides(setup, out, "max_steps=4", "seed=5"), "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "seed 0 -> 5" in err
    assert (
        main(["run", *overrides(setup, out, "max_steps=4", "seed=5"), "--resume", "--allow-config-change"])
        == 0
    )
    assert logged(out, "step") == [1, 2, 3, 4] and "seed: 5" in (out / "config.yaml").read_text()
