"""Issue 14, items 8, 9 and 11: a checkpoint's files carry digests that a resume verifies before reading
anything, meta.json is cross-checked against its folder and the state files, a refused resume changes no
byte of the run folder, and a full disk during a checkpoint is one line that keeps the previous one."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from functools import partial

import pytest

import fasttune
from fasttune.cli.main import main
from fasttune.train import loop as train
from fasttune.train.checkpoint import find_latest
from fasttune.train.config import load_config
from helpers import tiny_run_overrides

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEP2, STEP4 = "step-00000002", "step-00000004"


overrides = partial(
    tiny_run_overrides, warmup=0.1, eval_every=1000, save_every=2, samples=0, eval_examples=0, max_steps=6
)


def config(setup, out, *extra):
    return load_config(None, overrides(setup, out, *extra))


def losses(out, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder):
    """Every file of a run folder (metrics.jsonl, checkpoints/latest, every checkpoint file, the data, the
    tokenizer) by relative path, with its bytes. Not config.yaml: every start writes the config it runs,
    here with this copy's output_dir (what a resume may do with a changed config is item 10's)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / "config.yaml"
    }


@pytest.fixture(scope="module")
def stopped(setup, tmp_path_factory):
    """A 6-step run stopped by SIGTERM after step 4: checkpoints step-00000002 and step-00000004, the
    metrics of steps 1-4, and the losses the uninterrupted run logs."""
    root = tmp_path_factory.mktemp("ckpt")
    train.run(config(setup, root / "full"))

    def interrupt(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train.run(config(setup, root / "run"), on_step=interrupt)
    assert result.stopped == "signal" and result.step == 4
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["latest", STEP2, STEP4]
    return root


@pytest.fixture
def run_copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped / "run", out)
    return out


def shard(out, step=STEP4):
    (path,) = (out / "checkpoints" / step / "state").glob("*.safetensors")
    return path


def edit_meta(out, change, step=STEP4):
    path = out / "checkpoints" / step / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=1))


def resume_refused(setup, out, capsys) -> str:
    """`fasttune run ... --resume` refuses: exit status 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(["run", *overrides(setup, out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttune: error: ") and err.count("\n") == 1, err
    return err


def flip(path, n=1000):
    data = bytearray(path.read_bytes())
    start = len(data) // 2  # past the safetensors header: tensor bytes
    assert len(data) - start > n
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------------------
# Item 8: digests


def test_item08_meta_json_records_the_sha256_of_every_state_and_rng_file(stopped):
    folder = stopped / "run" / "checkpoints" / STEP4
    meta = json.loads((folder / "meta.json").read_text())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert set(meta["files"]) == on_disk and len(on_disk) == 2  # state/shard-...safetensors, rng-00000...
    for name, record in meta["files"].items():
        body = (folder / name).read_bytes()
        assert record == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("which", ["shard", "rng"])
def test_item08_flipped_bytes_refuse_the_resume_naming_the_file(setup, run_copy, capsys, which):
    target = (
        shard(run_copy) if which == "shard" else run_copy / "checkpoints" / STEP4 / "rng-00000.safetensors"
    )
    flip(target, n=1000 if which == "shard" else 100)  # the RNG file holds ~5 KB of generator state
    before = snapshot(run_copy)
    err = resume_refused(setup, run_copy, capsys)
    assert f"checkpoint {target} is corrupted (sha256 mismatch)" in err
    assert snapshot(run_copy) == before


def _corrupt_at(out, at_step):
    def hook(step, record):
        if step == at_step:
            flip(shard(out))

    return hook


def test_item08_the_nonfinite_guard_never_names_a_checkpoint_that_fails_verification(
    setup, tmp_path, monkeypatch
):
    real = fasttune.CausalLM.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):  # step 6's loss is NaN (one micro-batch per step)
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                return out * float("nan")
        return out

    monkeypatch.setattr(fasttune.CausalLM, "loss", loss)
    out = tmp_path / "run"
    # step-00000004 is written after step 4 and corrupted after step 5, before step 6 goes NaN
    with pytest.raises(train.NonFiniteError) as e:
        train.run(config(setup, out, "max_steps=8"), on_step=_corrupt_at(out, 5))
    message = str(e.value)
    assert f"last good checkpoint is {out / 'checkpoints' / STEP2}" in message
    assert f"{shard(out)} is corrupted (sha256 mismatch)" in message


# ----------------------------------------------------------------------------------------------------------
# Item 9: meta.json against its folder and the state files; nothing changes on a refused resume


def _drop(section, key):
    return lambda m: m[section].pop(key)


TAMPER = {
    "step": (lambda m: m.update(step=2), rf"meta.json says step 2 but its folder is {STEP4}"),
    "scheduler_step": (
        lambda m: m["scheduler"].update(last_epoch=2),
        r"meta.json: scheduler.last_epoch is 2 but the checkpoint is of step 4",
    ),
    "sampler_epoch": (_drop("sampler", "epoch"), r"meta.json: sampler.epoch is missing"),
    "sampler_position": (
        lambda m: m["sampler"].update(position="x"),
        r"meta.json: sampler.position must be a non-negative integer, got 'x'",
    ),
    "param_groups": (
        lambda m: m["optimizer"]["param_groups"].pop(),
        r"meta.json: optimizer.param_groups has 1 group\(s\), the optimizer has 2",
    ),
    "python_rng": (lambda m: m.update(python_rng=[3, [1, 2], None]), r"meta.json: python_rng is not"),
    "skips": (
        lambda m: m.update(skips=1),
        r"AdamW's step count is 4 in state/.*, meta.json's step 4 less skips 1 makes 3",
    ),
    "best_val": (lambda m: m.pop("best_val"), r"meta.json: best_val is missing"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_item09_meta_json_that_disagrees_is_one_error_and_nothing_changes(setup, run_copy, capsys, kind):
    change, message = TAMPER[kind]
    edit_meta(run_copy, change)
    before = snapshot(run_copy)
    err = resume_refused(setup, run_copy, capsys)
    assert f"checkpoint {run_copy / 'checkpoints' / STEP4}" in err
    assert re.search(message, err), err
    # metrics.jsonl (4 lines), latest (step 4) and both checkpoints byte for byte as they were
    assert snapshot(run_copy) == before
    assert len(losses(run_copy)) == 4


@pytest.mark.parametrize("digests", [True, False], ids=["with-digests", "older-checkpoint-without"])
def test_item09_a_missing_rng_file_is_an_error_not_a_reseed(setup, run_copy, capsys, digests):
    if not digests:
        edit_meta(run_copy, lambda m: m.pop("files"))
    rng = run_copy / "checkpoints" / STEP4 / "rng-00000.safetensors"
    rng.unlink()
    before = snapshot(run_copy)
    err = resume_refused(setup, run_copy, capsys)
    assert f"checkpoint {rng} is missing" in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("digests", [True, False], ids=["with-digests", "older-checkpoint-without"])
def test_item09_a_truncated_state_file_is_a_clear_error_naming_it(setup, run_copy, capsys, digests):
    if not digests:
        edit_meta(run_copy, lambda m: m.pop("files"))
    path = shard(run_copy)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    before = snapshot(run_copy)
    err = resume_refused(setup, run_copy, capsys)
    assert f"checkpoint {path} is truncated" in err and "SafetensorError" not in err
    if digests:
        assert f"{size // 2} bytes, meta.json records {size}" in err
    assert snapshot(run_copy) == before


def test_an_untouched_copy_resumes_to_the_uninterrupted_losses(setup, stopped, run_copy, capsys):
    assert main(["run", *overrides(setup, run_copy), "--resume"]) == 0
    assert f"resuming from {run_copy / 'checkpoints' / STEP4}" in capsys.readouterr().out
    assert losses(run_copy) == losses(stopped / "full")


# ----------------------------------------------------------------------------------------------------------
# Item 11: a full disk during a checkpoint


def _assert_disk_full_kept_step2(setup, stopped, out, err, tmp_path, capsys):
    """One line naming the checkpoint path and the free space; no partial folder; step 2 still latest and
    resumable to the uninterrupted run's losses."""
    assert err.startswith("fasttune: error: ") and err.count("\n") == 1, err
    assert f"no space left on device writing checkpoint {out / 'checkpoints' / STEP4}" in err
    assert " free on " in err and f"the previous checkpoint {out / 'checkpoints' / STEP2} is kept" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", STEP2]
    assert find_latest(out)[0].name == STEP2
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert main(["run", *overrides(setup, again), "--resume"]) == 0
    assert f"resuming from {again / 'checkpoints' / STEP2}" in capsys.readouterr().out
    assert losses(again) == losses(stopped / "full")


def test_item11_disk_full_while_writing_a_checkpoint_file_is_one_line(
    setup, stopped, tmp_path, capsys, monkeypatch
):
    """ENOSPC from fasttune's own file writer (the RNG states, written after the tensors)."""
    real = fasttune.train.checkpoint._save_tensors

    def full_at_step4(tensors, path):
        if f".{STEP4}.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path)

    monkeypatch.setattr(fasttune.train.checkpoint, "_save_tensors", full_at_step4)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", *overrides(setup, out)]) == 2
    err = capsys.readouterr().err
    monkeypatch.setattr(fasttune.train.checkpoint, "_save_tensors", real)
    _assert_disk_full_kept_step2(setup, stopped, out, err, tmp_path, capsys)


@pytest.fixture
def small_filesystem(stopped, tmp_path):
    """A tmpfs at OUT/checkpoints with room for one checkpoint and a half: the second checkpoint's tensors
    hit ENOSPC inside torch.distributed.checkpoint's writer. Needs root (mount)."""
    one = sum(p.stat().st_size for p in (stopped / "run" / "checkpoints" / STEP2).rglob("*") if p.is_file())
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    size_kib = (3 * one // 2) // 1024 + 16
    name = f"fasttune-test-{uuid.uuid4().hex[:8]}"
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", name, str(mount)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({p.stderr.strip()}); the writer seam test covers ENOSPC"
        )
    try:
        yield tmp_path / "run"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_item11_disk_full_on_a_small_filesystem_is_one_line(
    setup, stopped, small_filesystem, tmp_path, capsys
):
    out = small_filesystem
    capsys.readouterr()
    # --force: the folder already holds the mount point, which is not a run's (run_folder.py refuses it)
    assert main(["run", *overrides(setup, out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointException" not in err and "Traceback" not in err
    _assert_disk_full_kept_step2(setup, stopped, out, err, tmp_path, capsys)
