"""The training loop: parity with a plain transformers + torch.optim.AdamW loop, exact resume after SIGTERM,
crash-safe checkpoints, the non-finite guard, LoRA export, and config errors that start nothing."""

import json
import math
import os
import signal

import pytest
import torch
import transformers

import fasttune
from fasttune.cli.main import main
from fasttune.data.packing import PackedSampler, TokenizedData, collate
from fasttune.train import loop as train
from fasttune.train.checkpoint import find_latest
from fasttune.train.config import load_config
from helpers import tiny_run_overrides

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(setup, out, *overrides):
    return load_config(
        None,
        tiny_run_overrides(setup, out, *overrides, warmup=0.1, eval_every=1000, save_every=1000, samples=0),
    )


def logged(out, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def reference_losses(setup, out, cfg) -> list[float]:
    """The same steps written plainly: transformers' model on each sequence alone, per-token mean over the
    step's targets, torch.optim.AdamW, transformers' cosine schedule, clip_grad_norm_."""
    data = TokenizedData.load(out / "data" / "tokenized" / "train")
    model = transformers.AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    accumulate = (cfg.tokens_per_step or cfg.micro_batch_tokens) // cfg.micro_batch_tokens
    sched = transformers.get_cosine_schedule_with_warmup(
        opt, round(cfg.optim.warmup * cfg.max_steps), cfg.max_steps
    )
    sampler = PackedSampler(data.lengths, cfg.micro_batch_tokens, seed=cfg.seed)
    bins = (b for _ in range(100) for b in sampler)
    losses = []
    for _ in range(cfg.max_steps):
        micro = [collate(data, next(bins)) for _ in range(accumulate)]
        n = sum(b.num_targets for b in micro)
        total = 0.0
        for b in micro:
            cu = b.cu_seqlens.tolist()
            for s, e in zip(cu[:-1], cu[1:], strict=True):
                logits = model(input_ids=b.input_ids[:, s:e]).logits[0]
                ce = torch.nn.functional.cross_entropy(
                    logits, b.targets[0, s:e], ignore_index=-100, reduction="sum"
                )
                (ce / n).backward()
                total += ce.item()
        losses.append(total / n)
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("tokens_per_step", [None, 2048])  # one micro-batch, or 4 of unequal token counts
def test_loop_matches_a_plain_transformers_loop(setup, tmp_path, tokens_per_step):
    extra = [f"tokens_per_step={tokens_per_step}"] if tokens_per_step else []
    cfg = config(setup, tmp_path, "max_steps=20", *extra)
    train.run(cfg)
    ours = logged(tmp_path)
    if tokens_per_step:
        targets = logged(tmp_path, "targets")
        assert len(set(targets)) > 1  # the steps really have different numbers of targets
    expected = reference_losses(setup, tmp_path, cfg)
    assert len(ours) == 20
    for step, (a, b) in enumerate(zip(ours, expected, strict=True), start=1):
        assert abs(a - b) < 1e-4, (step, a, b)
    assert ours[-1] < ours[0] - 0.5  # and it learns


def test_sigterm_then_resume_gives_the_uninterrupted_losses(setup, tmp_path, capsys):
    full = config(setup, tmp_path / "full", "max_steps=10", "method=lora", "lora.dropout=0.1")
    train.run(full)
    expected = logged(tmp_path / "full")

    cfg = config(setup, tmp_path / "cut", "max_steps=10", "method=lora", "lora.dropout=0.1")

    def interrupt(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.run(cfg, on_step=interrupt)
    assert stopped.stopped == "signal" and stopped.step == 5
    assert "stopped by SIGTERM after step 5" in capsys.readouterr().out
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = train.run(cfg, resume=True)
    assert "resuming from" in capsys.readouterr().out and resumed.step == 10
    assert logged(tmp_path / "cut") == expected  # identical, not close: the same arithmetic in the same order


def test_a_crash_during_a_checkpoint_leaves_the_previous_one(setup, tmp_path, monkeypatch, capsys):
    cfg = config(setup, tmp_path, "max_steps=8", "save_every=3")
    real = fasttune.train.checkpoint._save_state

    def crash_on_the_second_checkpoint(state, folder):
        real(state, folder)  # the tensors are written; the crash comes before meta.json and the rename
        if ".step-00000006" in str(folder):
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(fasttune.train.checkpoint, "_save_state", crash_on_the_second_checkpoint)
    with pytest.raises(OSError, match="simulated"):
        train.run(cfg)
    monkeypatch.setattr(fasttune.train.checkpoint, "_save_state", real)
    found, why = find_latest(tmp_path)
    assert found.name == "step-00000003" and "named by" in why
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    result = train.run(cfg, resume=True)
    assert f"resuming from {tmp_path / 'checkpoints' / 'step-00000003'}" in capsys.readouterr().out
    assert result.step == 8 and logged(tmp_path, "step") == list(range(1, 9))


def _poison(monkeypatch, at_call: int):
    real = fasttune.CausalLM.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                return out * float("nan")
        return out

    monkeypatch.setattr(fasttune.CausalLM, "loss", loss)


def test_a_nan_loss_stops_with_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    _poison(monkeypatch, at_call=5)
    cfg = config(setup, tmp_path, "max_steps=8", "save_every=2")
    with pytest.raises(
        train.NonFiniteError, match="step 5: non-finite loss nan.*last good checkpoint is .*step-00000004"
    ):
        train.run(cfg)
    assert find_latest(tmp_path)[0].name == "step-00000004"
    assert max(logged(tmp_path, "step")) == 4


def test_nonfinite_skips_lets_the_run_continue(setup, tmp_path, monkeypatch):
    _poison(monkeypatch, at_call=3)
    result = train.run(config(setup, tmp_path, "max_steps=6", "nonfinite_skips=1"))
    assert result.step == 6 and logged(tmp_path, "step") == [1, 2, 4, 5, 6]


def test_lora_adapter_and_merged_model_load_in_peft_and_transformers(setup, tmp_path):
    import peft

    cfg = config(setup, tmp_path, "max_steps=4", "method=lora", "lora.merge=true", "lr=1e-2")
    train.run(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    ours = fasttune.load_model(setup / "model")
    from fasttune.models.lora import load_adapter

    load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        expected = ours.logits(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
        assert (base(ids).logits - expected).abs().max() > 1e-4  # the adapter learned something
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 16 and config_json["peft_type"] == "LORA"
    assert (tmp_path / "config.yaml").exists() and len(logged(tmp_path)) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "evl_every=3"], "did you mean 'eval_every'"),
        (["run", "max_steps=ten"], "max_steps must be int"),
        (["run", "data.files=[/nonexistent/data.jsonl]"], "data.files: /nonexistent/data.jsonl not found"),
    ],
)
def test_config_errors_start_nothing(tmp_path, capsys, args, message):
    assert main(args + [f"output_dir={tmp_path / 'out'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_config_json_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["run", f"model={tmp_path / 'm'}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_print_config_and_dry_run(capsys, setup):
    assert main(["run", "--print-config", "max_steps=7"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "lr: 0.003" in printed
    assert main(["run", "--dry-run", f"model={setup / 'model'}", "method=lora"]) == 0
    out = capsys.readouterr().out
    assert "trained tokens in [[...]]" in out and "M trainable (lora)" in out and "memory estimate" in out


def test_builtin_default_run_learns_and_exports_a_transformers_folder(tmp_path, capsys):
    """`fasttune run` with no config: the built-in corpus, a BPE trained on it, a tiny Qwen2 from scratch."""
    assert main(["run", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3 and vals[-1] < vals[0] - 1.0  # clearly falls
    assert "->" in out and "test loss" in out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    ours = fasttune.load_model(tmp_path / "model")
    ids = torch.tensor(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": "Tell me about bread."}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours.logits(ids), rtol=1e-5, atol=1e-5)
    assert math.isfinite(vals[-1])


def test_activation_checkpointing_and_compile_give_the_same_losses(setup, tmp_path):
    train.run(config(setup, tmp_path / "plain", "max_steps=3"))
    train.run(config(setup, tmp_path / "ac", "max_steps=3", "activation_checkpointing=true"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train.run(
        config(setup, tmp_path / "compiled", "max_steps=3", "compile=true", "activation_checkpointing=true")
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not silently eager
    # The SDPA reference reads cu_seqlens on the host to loop over sequences: that data-dependent read is
    # the only graph break allowed (flash-attn takes cu_seqlens on the device).
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert all("Data dependent operator" in reason for reason in breaks), list(breaks)
    plain = logged(tmp_path / "plain")
    assert logged(tmp_path / "ac") == plain  # recomputation repeats the same arithmetic
    for a, b in zip(logged(tmp_path / "compiled"), plain, strict=True):
        assert abs(a - b) < 1e-5  # compiled kernels may fuse and reorder float operations


def test_tensorboard_without_the_package_says_so(setup, tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level("WARNING", logger="fasttune"):
        train.run(config(setup, tmp_path, "max_steps=1", "tensorboard=true"))
    assert "the tensorboard package is not installed" in caplog.text and len(logged(tmp_path)) == 1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_loop_with_triton_kernels_gives_the_reference_losses(setup, tmp_path, method):
    """kernels=triton (through the interpreter on the CPU: slow, so 2 small steps) against kernels=torch."""
    small = ("max_steps=2", "micro_batch_tokens=192", "max_seq_len=192", f"method={method}")
    train.run(config(setup, tmp_path / "torch", *small, "kernels=torch"))
    train.run(config(setup, tmp_path / "triton", *small, "kernels=triton"))
    for a, b in zip(logged(tmp_path / "triton"), logged(tmp_path / "torch"), strict=True):
        assert abs(a - b) < 1e-4 * abs(b)


def test_the_end_of_a_run_reports_generations_and_their_metrics(setup, tmp_path, capsys):
    from fasttune.eval.evaluate import split_loss

    cfg = config(setup, tmp_path, "max_steps=3", "samples=2", "eval_examples=4", "data.split=[0.8,0.1,0.1]")
    result = train.run(cfg)
    report = json.loads((tmp_path / "eval.json").read_text())
    test = TokenizedData.load(tmp_path / "data" / "tokenized" / "test")
    assert report["loss"] == result.test_loss  # the run's own measurement, not a second pass
    fresh = split_loss(fasttune.load_model(tmp_path / "model", dtype=torch.float32), test, 512)
    assert report["targets"] == fresh["targets"] and abs(report["loss"] - fresh["loss"]) < 1e-5
    assert report["metrics"]["examples"] == len(report["generations"]) == min(4, len(test))
    assert len(result.samples) == 2 and result.samples[0][1] == report["generations"][0]["generation"]
    out = capsys.readouterr().out
    assert f"evaluation on {min(4, len(test))} test prompts" in out and result.samples[1][1] in out
