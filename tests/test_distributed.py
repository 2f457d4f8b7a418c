"""Several processes on the CPU (gloo), launched the way users launch them (`fasttune run --nproc 2`):
FSDP2 and DDP give the losses of one process over the same global batch, a checkpoint written by two
processes resumes in one and in two, the exports load in transformers and peft, and a SIGTERM to one
rank stops every rank after a checkpoint. Plus the pieces that need no processes: GeForce detection, the
launch command, the strategy choice."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers

from fasttune.cli.run import _without_nproc
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.train import distributed
from fasttune.train import loop as train
from fasttune.train.checkpoint import find_latest
from fasttune.train.config import load_config
from fasttune.train.distributed import SINGLE, Dist
from fasttune.train.parallelize import choose_strategy, training_state_bytes
from helpers import rank_logs, read_rank_results, tiny_run_overrides, torchrun, torchrun_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


overrides = partial(
    tiny_run_overrides,
    tokens_per_step=1024,  # the global batch: 2 micro-batches, one per rank (or both in one process)
    warmup=0.1,
    eval_every=5,
    save_every=5,
    samples=0,
    max_steps=10,
)


def _log_dir(out) -> Path:
    """A fresh folder beside `out` for one launch's per-rank logs (a resume into `out` gets its own)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}-logs-", dir=out.parent))


def launch(setup, out, *extra, resume=False, nproc=2) -> dict[int, str]:
    """`fasttune run --nproc N` as a user runs it; returns each rank's stdout, read from a file per rank
    (never from the one pipe that all ranks share)."""
    cmd = [sys.executable, "-m", "fasttune.cli", "run", "--nproc", str(nproc), *overrides(setup, out, *extra)]
    if resume:
        cmd.append("--resume")
    logs = _log_dir(out)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=torchrun_env(logs))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return rank_logs(logs)


def logged(out, key="loss"):
    return [json.loads(x).get(key) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, steps=None):
    for key in ("loss", "grad_norm", "val_loss"):
        x, y = logged(a, key), logged(b, key)
        assert len(x) == len(y)
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            if steps is not None and i + 1 not in steps:
                continue
            assert (u is None) == (v is None), (key, i + 1)
            if u is not None:
                assert abs(u - v) <= 1e-5 * abs(u), (key, i + 1, u, v)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """One process in this one, then FSDP and DDP in two processes, same config (10 steps, a checkpoint
    every 5)."""
    root = tmp_path_factory.mktemp("dist")
    train.run(load_config(None, overrides(setup, root / "one")))
    launch(setup, root / "fsdp", "strategy=fsdp")
    launch(setup, root / "ddp", "strategy=ddp")
    return root


def test_fsdp_and_ddp_give_the_losses_of_one_process(runs):
    assert logged(runs / "one", "step") == list(range(1, 11))
    assert_same_run(runs / "one", runs / "fsdp")
    assert_same_run(runs / "one", runs / "ddp")
    # the checkpoint holds one safetensors file of shards per rank, and each rank's random state
    ckpt = runs / "fsdp" / "checkpoints" / "step-00000010"
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    ]
    assert (ckpt / "rng-00001.safetensors").is_file()
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_export_is_one_folder_that_transformers_loads(runs, strategy):
    folder = runs / strategy / "model"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    ids = torch.tensor([[3, 17, 42, 7, 99, 5]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(runs / "one" / "model").eval()(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_checkpoint_of_two_processes_resumes_in_one_and_in_two(runs, setup, tmp_path, nproc):
    out = tmp_path / "resumed"
    shutil.copytree(runs / "fsdp", out)
    shutil.rmtree(out / "checkpoints" / "step-00000010")  # back to step 5
    shutil.rmtree(out / "model")
    assert find_latest(out)[0].name == "step-00000005"
    if nproc == 1:
        train.run(load_config(None, overrides(setup, out)), resume=True)
    else:
        stdout = launch(setup, out, "strategy=fsdp", resume=True)[0]  # rank 0 speaks for the run
        assert "resuming from" in stdout and "step 5" in stdout
    assert logged(out, "step") == list(range(1, 11))
    assert_same_run(runs / "one", out, steps=range(6, 11))
    assert (out / "model" / "model.safetensors").is_file()


def test_lora_under_fsdp_matches_one_process_and_exports_a_peft_adapter(setup, tmp_path):
    import peft

    extra = ("method=lora", "lora.dropout=0", "max_steps=3")
    train.run(load_config(None, overrides(setup, tmp_path / "one", *extra)))
    launch(setup, tmp_path / "fsdp", "strategy=fsdp", *extra)
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    base = transformers.AutoModelForCausalLM.from_pretrained(setup / "model")
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "fsdp" / "adapter").eval()
    ids = torch.tensor([[3, 17, 42, 7]])
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(setup / "model"), tmp_path / "one" / "adapter"
        ).eval()(ids)
        torch.testing.assert_close(tuned(ids).logits, ref.logits, rtol=1e-5, atol=1e-5)


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _local_rank(pid: int) -> int | None:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def test_sigterm_to_one_rank_stops_every_rank_after_a_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fasttune.cli", "run", "--nproc", "2"]
    cmd += overrides(setup, out, "max_steps=100000", "eval_every=100000", "save_every=100000")
    logs = _log_dir(out)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=torchrun_env(logs)
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the loop runs
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        workers = [p for p in _children(proc.pid) if _local_rank(p) == 1]
        assert len(workers) == 1, _children(proc.pid)
        os.kill(workers[0], signal.SIGTERM)
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    last = logged(out, "step")[-1]
    assert last < 100000
    assert f"stopped by a signal on another rank after step {last}" in rank_logs(logs)[0]
    ckpt, why = find_latest(out)
    assert ckpt.name == f"step-{last:08d}" and "named by" in why
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "meta.json",
        "rng-00000.safetensors",
        "rng-00001.safetensors",
        "state",
    ]


def test_ranks_agree_when_any_has_a_geforce_card(tmp_path):
    """The NCCL decision is taken on every rank from the same all-reduce: rank 1 alone says yes. Each
    rank writes its answer to a file of its own (the shared stdout pipe once interleaved two ranks'
    lines into one)."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from helpers import write_rank_result\n"
        "from fasttune.train import distributed\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "answer = [distributed.agree_any(rank == 1), distributed.agree_any(False)]\n"
        "write_rank_result(sys.argv[1], rank, answer)\n"
        "dist.destroy_process_group()\n"
    )
    torchrun(script, tmp_path / "logs", args=[str(tmp_path)])
    assert read_rank_results(tmp_path, 2) == [[True, False], [True, False]]


def test_two_ranks_writing_at_once_cannot_break_the_assertion(tmp_path):
    """The pattern behind the race CI hit: both ranks print thousands of unbuffered lines into the same
    console at the same moment (which interleaves them there), and each rank's stdout file and result
    file still hold exactly that rank's lines and answer."""
    script = tmp_path / "flood.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from helpers import write_rank_result\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "dist.barrier()\n"
        "for i in range(3000):\n"
        "    print(f'rank {rank}: {i}', end='')\n"
        "    print()\n"  # two writes per line: the way a line gets split in a shared pipe
        "write_rank_result(sys.argv[1], rank, {'rank': rank, 'lines': 3000})\n"
        "dist.destroy_process_group()\n"
    )
    logs = torchrun(script, tmp_path / "logs", args=[str(tmp_path)], env={"PYTHONUNBUFFERED": "1"})
    for rank in (0, 1):
        assert logs[rank].splitlines() == [f"rank {rank}: {i}" for i in range(3000)]
    assert read_rank_results(tmp_path, 2) == [{"rank": 0, "lines": 3000}, {"rank": 1, "lines": 3000}]


def test_geforce_cards_are_recognised():
    assert distributed.is_consumer_gpu("NVIDIA GeForce RTX 4090")
    assert distributed.is_consumer_gpu("NVIDIA GeForce RTX 3090 Ti")
    assert distributed.is_consumer_gpu("NVIDIA TITAN RTX")
    assert not distributed.is_consumer_gpu("NVIDIA H100 80GB HBM3")
    assert not distributed.is_consumer_gpu("NVIDIA A100-SXM4-80GB")
    assert not distributed.is_consumer_gpu("NVIDIA RTX 6000 Ada Generation")
    assert distributed.CONSUMER_NCCL_ENV == {"NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1"}


def test_the_launch_command_is_torchrun_with_the_same_arguments():
    argv = ["run", "cfg.yaml", "--nproc", "4", "lr=1e-4", "--resume"]
    assert _without_nproc(argv) == ["run", "cfg.yaml", "lr=1e-4", "--resume"]
    assert _without_nproc(["run", "--nproc=4", "x=1"]) == ["run", "x=1"]
    cmd = distributed.launch_command(4, _without_nproc(argv))
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "fasttune.cli", "run", "cfg.yaml", "lr=1e-4", "--resume"]


def test_nproc_is_refused_inside_a_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.FasttuneError, match="inside a torchrun launch"):
        distributed.launch(2, ["run"])


def test_strategy_choice():
    cfg = ModelConfig.from_hf(
        {
            "model_type": "qwen2",
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
        }
    )
    with torch.device("meta"):
        model = CausalLM(cfg)
    n = model.num_parameters()
    # fp32 master weights + fp32 gradients + two fp32 AdamW states: 16 bytes per trainable parameter
    assert training_state_bytes(model, "fp32") == 16 * n
    assert training_state_bytes(model, "bf16") == 16 * n
    cpu = torch.device("cpu")
    assert choose_strategy("auto", model, cpu, "fp32", SINGLE) == "single"
    two = Dist(rank=0, world_size=2)
    assert choose_strategy("auto", model, cpu, "fp32", two) == "ddp"  # no device memory to save on the CPU
    assert choose_strategy("fsdp", model, cpu, "fp32", two) == "fsdp"
