"""Issue 15 item 2: one training step (train.step.train_step) that `fasttune run`, `fasttune bench` and
the CI gate all train through. The step equals the loop's former inline step, its guard blocks the update,
and a change to the step (its guard, or a non-finite loss) is seen by the gate's fasttune runner exactly as
`fasttune run` sees it."""

import re

import pytest
import torch

import fasttune
from fasttune.bench import gate, runners
from fasttune.bench.workloads import tiny_workload
from fasttune.data.packing import TokenizeOptions, collate, tokenize
from fasttune.data.records import read_sources
from fasttune.train import loop as train
from fasttune.train import step as one_step
from fasttune.train.config import load_config
from fasttune.train.parallelize import Parallel
from helpers import tiny_run_overrides

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOSS = fasttune.CausalLM.loss  # the real one, whatever a test has patched since
GUARD_SENTENCE = re.compile(
    r"step \d+: non-finite loss \S+, gradient norm \S+; stopped before the optimizer step"
)


def run_config(setup, out, *overrides):
    return load_config(
        None, tiny_run_overrides(setup, out, *overrides, eval_every=1000, save_every=1000, samples=0)
    )


def _model_and_step(setup, lr=1e-3):
    model = fasttune.load_model(setup / "model", dtype=torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    return model, params, opt, sched


def _micro_batches(setup):
    """Two micro-batches of unequal target counts, so that per-token weighting matters."""
    examples, _ = read_sources([str(setup / "data.jsonl")])
    data, _ = tokenize(
        examples[:12], fasttune.load_tokenizer(setup / "model"), TokenizeOptions(512, "drop", "none")
    )
    return [collate(data, list(range(0, 3))), collate(data, list(range(3, 10)))]


def _former_inline_step(model, micro, params, opt, sched, grad_clip=1.0):
    """The step as train._run wrote it before train_step (one process, fp32)."""
    n_targets = sum(b.num_targets for b in micro)
    loss_sum = torch.zeros(())
    for b in micro:
        loss = model.loss(b.input_ids, b.targets, b.position_ids, b.cu_seqlens, b.max_seqlen)
        (loss * (b.num_targets / n_targets * 1)).backward()
        loss_sum += loss.detach().float() * b.num_targets
    step_loss = (loss_sum / n_targets).item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return step_loss, grad_norm, sched.get_last_lr()[0]


def _step(model, micro, params, opt, sched, precision="fp32"):
    return one_step.train_step(
        Parallel(model),
        micro,
        opt,
        sched,
        params=params,
        targets=sum(b.num_targets for b in micro),
        tokens=sum(b.num_tokens for b in micro),
        precision=precision,
        grad_clip=1.0,
        device=torch.device("cpu"),
    )


def test_item02_train_step_is_the_former_loop_step(setup):
    micro = _micro_batches(setup)
    old_model, old_params, old_opt, old_sched = _model_and_step(setup)
    new_model, new_params, new_opt, new_sched = _model_and_step(setup)
    for _ in range(2):
        loss, grad_norm, lr = _former_inline_step(old_model, micro, old_params, old_opt, old_sched)
        r = _step(new_model, micro, new_params, new_opt, new_sched)
        assert (r.loss, r.grad_norm, r.lr) == (loss, grad_norm, lr) and r.finite and not r.stop
        assert r.targets == sum(b.num_targets for b in micro) and r.tokens == sum(b.num_tokens for b in micro)
    for a, b in zip(old_params, new_params, strict=True):
        assert torch.equal(a, b)


def _poison(monkeypatch, at_call: int):
    """The training forward's `at_call`-th loss becomes NaN (as tests/test_train.py injects it)."""
    real = LOSS
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                return out * float("nan")
        return out

    monkeypatch.setattr(fasttune.CausalLM, "loss", loss)


def test_item02_the_guard_blocks_the_update(setup, monkeypatch):
    micro = _micro_batches(setup)
    model, params, opt, sched = _model_and_step(setup)
    before = [p.detach().clone() for p in params]
    _poison(monkeypatch, at_call=2)  # the step's second micro-batch
    r = _step(model, micro, params, opt, sched)
    assert not r.finite and r.loss != r.loss  # NaN
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))  # no update
    assert all(p.grad is None for p in params) and not opt.state  # gradients dropped, no AdamW moments
    assert sched.last_epoch == 1  # the schedule moved on with the step count
    r = _step(model, micro, params, opt, sched)  # the next step trains again
    assert r.finite and not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))


@pytest.fixture(scope="module")
def small_gate_workload(tmp_path_factory):
    """The gate's workload (its tiny checkpoint, corpus and step plan), small: a few steps."""
    return tiny_workload(tmp_path_factory.mktemp("gate"), n_examples=200, tokens=4000)


def _fasttune_runner(workload, **kw):
    model_dir, data, plan = workload
    return gate.run_fasttune(model_dir, data, plan, torch.device("cpu"), torch.float32, 1, lr=1e-3, **kw)


def test_item02_the_gate_and_fasttune_run_train_through_train_step(
    setup, small_gate_workload, tmp_path, monkeypatch
):
    assert gate.run_fasttune is runners.run_fasttune  # the gate's fasttune contestant is this runner
    real, calls = one_step.train_step, []

    def counted(*args, **kwargs):
        r = real(*args, **kwargs)
        calls.append(r)
        return r

    monkeypatch.setattr(one_step, "train_step", counted)
    result = _fasttune_runner(small_gate_workload, kernels="torch")
    assert len(calls) == len(small_gate_workload[2].steps) == len(result.losses) >= 3
    assert result.losses == [r.loss for r in calls]  # the gate measures train_step's own numbers
    calls.clear()
    run = train.run(run_config(setup, tmp_path, "max_steps=2"))
    assert [r.loss for r in calls] == run.losses and len(run.losses) == 2


def _guard_sentence(excinfo) -> str:
    found = GUARD_SENTENCE.search(str(excinfo.value))
    assert found, str(excinfo.value)
    return found.group(0)


def test_item02_a_nonfinite_loss_stops_the_gate_as_it_stops_fasttune_run(
    setup, small_gate_workload, tmp_path, monkeypatch
):
    _poison(monkeypatch, at_call=2)
    with pytest.raises(train.NonFiniteError) as in_gate:
        _fasttune_runner(small_gate_workload, kernels="torch")
    _poison(monkeypatch, at_call=2)
    with pytest.raises(train.NonFiniteError) as in_run:
        train.run(run_config(setup, tmp_path, "max_steps=4"))
    assert (
        _guard_sentence(in_gate)
        == _guard_sentence(in_run)
        == ("step 2: non-finite loss nan, gradient norm nan; stopped before the optimizer step")
    )
    assert str(in_gate.value).startswith("fasttune_torch: step 2:")


def test_item02_a_changed_guard_is_seen_by_the_gate(setup, small_gate_workload, tmp_path, monkeypatch):
    monkeypatch.setattr(one_step, "is_finite", lambda loss, grad_norm: False)  # a guard that refuses all
    with pytest.raises(train.NonFiniteError) as in_gate:
        _fasttune_runner(small_gate_workload, kernels="torch")
    with pytest.raises(train.NonFiniteError) as in_run:
        train.run(run_config(setup, tmp_path, "max_steps=4"))
    assert _guard_sentence(in_gate).startswith("step 1: non-finite loss ")
    assert _guard_sentence(in_run).startswith("step 1: non-finite loss ")


def test_item02_the_bf16_variant_is_fasttune_runs_bf16(small_gate_workload, monkeypatch):
    """bfloat16 in the bench means `fasttune run`'s precision=bf16: fp32 master weights, bf16 autocast."""
    real, seen = one_step.train_step, []

    def spy(par, micro, *args, precision, **kwargs):
        seen.append((precision, {p.dtype for p in par.model.parameters()}))
        return real(par, micro, *args, precision=precision, **kwargs)

    monkeypatch.setattr(one_step, "train_step", spy)
    model_dir, data, plan = small_gate_workload
    short = runners.StepPlan(plan.steps[:1], plan.bucket)
    result = runners.run_fasttune(
        model_dir, data, short, torch.device("cpu"), torch.bfloat16, 0, kernels="torch"
    )
    assert seen == [("bf16", {torch.float32})] and len(result.losses) == 1
