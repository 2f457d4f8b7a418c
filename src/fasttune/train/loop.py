"""The hand-written training loop behind `fasttune run`.

Each step goes through `train.step.train_step` (the step `fasttune bench` and the CI gate run too); this
module sets the run up and runs the loop around it: the skip-or-stop policy for non-finite steps, eval,
save, log, signals.

One optimizer step = `accumulate` packed micro-batches. The loss of a step is the sum of the cross-entropy
over all its target tokens divided by their number: each micro-batch's mean loss is weighted by its share
of the step's targets before backward, so micro-batches of unequal size count per token, not per batch
(the count is known on the host from packing: no device sync to get it). The gradient norm is logged
before clipping. Before the optimizer step, the loss and the gradient norm are checked: a non-finite value
stops the run with the last good checkpoint untouched (or skips the step, up to `nonfinite_skips` times).

SIGTERM and SIGINT set a flag; the current step finishes, a checkpoint is written and the run returns
with `stopped="signal"`. Resuming restores model, optimizer, scheduler, sampler position and RNG states,
so the resumed run's losses are those the uninterrupted run would have had.

Under torchrun (N processes) the loop is the same with three changes. Data: every rank draws the same
global sequence of packed micro-batches (same seed) and takes every N-th, so the ranks see disjoint data
with the same token budget; `tokens_per_step` is the global batch, split into N x accumulate equal
micro-batches of at most micro_batch_tokens (distributed.split_global_batch), and the number of target
tokens of the whole global step, which every rank can count on the host from the bins it drew, normalises
the loss. Agreement: one all-reduce per step carries the summed loss and each rank's stop flag, so a
signal on any rank stops every rank at the same step boundary, after the same checkpoint. Files: rank 0
prepares data and writes logs and exports; the checkpoint is written by all ranks together (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttune.data import synth
from fasttune.data.packing import (
    Batch,
    PackedSampler,
    TokenizedData,
)
from fasttune.data.records import write_jsonl
from fasttune.devices import resolve_device
from fasttune.errors import FasttuneError
from fasttune.eval.evaluate import loss_over_bins
from fasttune.models.kernels import apply_kernels
from fasttune.models.model import CausalLM, rope_inv_freq
from fasttune.models.weights import parse_dtype, save_model
from fasttune.train import config_diff, distributed, run_folder
from fasttune.train import step as one_step
from fasttune.train.checkpoint import find_latest, load_checkpoint, resume_advice, save_checkpoint
from fasttune.train.config import RunConfig
from fasttune.train.distributed import SINGLE, Dist, all_reduce_sum, barrier
from fasttune.train.metrics import MetricsLog, flops_per_token, peak_flops
from fasttune.train.parallelize import Parallel
from fasttune.train.setup import (
    build_optimizer,
    build_parallel,
    build_tokenizer,
    prepare_data,
)

log = logging.getLogger("fasttune")


class NonFiniteError(FasttuneError):
    """A non-finite loss or gradient norm, with the step and the last good checkpoint named."""


@dataclass
class RunResult:
    output_dir: Path
    step: int
    stopped: str  # "done", "signal", "early_stopping"
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    test_loss: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# The loop


def _autocast(cfg: RunConfig, device: torch.device, par: Parallel | None = None):
    return one_step.autocast(cfg.precision, device, par)  # the step's rule, so evaluation computes alike


def _loss(model: CausalLM | Parallel, b: Batch) -> torch.Tensor:
    return model.loss(b.input_ids, b.targets, b.position_ids, b.cu_seqlens, b.max_seqlen)


@torch.no_grad()
def evaluate(
    model: CausalLM,
    data: TokenizedData,
    cfg: RunConfig,
    device: torch.device,
    env: Dist = SINGLE,
    par: Parallel | None = None,
) -> float | None:
    """Mean cross-entropy over every target token of `data` (packed as in training). Under several
    processes each rank takes every N-th bin; a rank short of bins runs its first one again with weight 0,
    since under FSDP every rank must join every forward pass."""
    if len(data) == 0:
        return None
    bins = PackedSampler(data.lengths, cfg.micro_batch_tokens, seed=cfg.seed).bins()
    cast = _autocast(cfg, device, par)
    total, count = loss_over_bins(
        model, data, bins, device, cast, env.rank, env.world_size, cfg.micro_batch_tokens
    )
    if env.enabled:
        both = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
        total, count = float(both[0]), int(both[1])
    return total / count


class _StopFlag:
    """SIGTERM/SIGINT -> finish the step, save, return. Installed only on the main thread."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _micro_batches(sampler: PackedSampler):
    while True:
        yield from sampler


class _NoMetrics:
    """Ranks other than 0 log nothing."""

    def step(self, record):
        pass

    def drop_after(self, step):
        pass

    def close(self):
        pass


def _prepare_inputs(cfg: RunConfig, out: Path, env: Dist):
    """Corpus, tokenizer and tokenized data: written by rank 0, then read by every rank."""
    corpus_file = None
    if not cfg.data.files:
        corpus_file = out / "data" / "proverbs.jsonl"
        if env.is_main and not corpus_file.exists():
            write_jsonl(corpus_file, synth.generate(cfg.data.synth_n, cfg.seed))
    if env.is_main:
        tokenizer = build_tokenizer(cfg, out, corpus_file)
        data = prepare_data(cfg, tokenizer, out, corpus_file)
    barrier()
    if not env.is_main:
        tokenizer = build_tokenizer(cfg, out, corpus_file)  # the saved one: rank 0 trained it
        data = {s: TokenizedData.load(out / "data" / "tokenized" / s) for s in ("train", "val", "test")}
    return tokenizer, data


def run(
    cfg: RunConfig,
    resume: bool = False,
    on_step=None,
    *,
    force: bool = False,
    allow_config_change: bool = False,
) -> RunResult:
    """Train as `cfg` says. `on_step(step, record)` is called after each optimizer step (tests use it).
    Under torchrun every rank calls this; rank 0's result carries the exports and samples. The output
    folder is checked and locked first (run_folder.py): `force` writes into a folder that is not a run's,
    or starts a run's folder over; `allow_config_change` resumes with trajectory keys changed."""
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device, "device")
    env = distributed.init(device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    try:
        with run_folder.claim(
            cfg, env, resume=resume, force=force, allow_config_change=allow_config_change
        ) as folder:
            result = _run(cfg, resume, on_step, out, device, env, folder)
            if result.stopped != "signal":
                folder.finished(result.step)
            return result
    finally:
        if env.enabled:
            distributed.shutdown()


@dataclass
class _Progress:
    """What a checkpoint saves of the loop besides model, optimizer, scheduler and sampler."""

    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without a better validation loss (early stopping)
    skips: int = 0  # non-finite steps skipped so far


def _run(
    cfg: RunConfig, resume: bool, on_step, out: Path, device: torch.device, env: Dist, folder
) -> RunResult:
    torch.manual_seed(cfg.seed)
    tokenizer, data = _prepare_inputs(cfg, out, env)
    par = build_parallel(cfg, tokenizer, device, out, env)
    model = par.model
    model.train()
    train = data["train"]
    layout = distributed.split_global_batch(
        cfg.tokens_per_step,
        cfg.micro_batch_tokens,
        cfg.data.max_seq_len,
        env.world_size,
        run_folder.saved_budget(out, cfg) if resume else None,
    )
    if env.is_main and layout.budget != cfg.micro_batch_tokens:
        log.info(layout.describe(cfg.micro_batch_tokens))
    budget, per_step = layout.budget, layout.per_step  # per_step: micro-batches in one step, all ranks
    sampler = PackedSampler(train.lengths, budget, seed=cfg.seed, weights=train.weight)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(sampler) / per_step))
    optimizer, scheduler = build_optimizer(cfg, model, device, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fpt = flops_per_token(model, float(train.lengths.mean()), lora=cfg.method != "full")
    peak = peak_flops(device)
    metrics = (
        MetricsLog(out, total_steps, cfg.log_every, cfg.tensorboard, resume=resume)
        if env.is_main
        else (_NoMetrics())
    )
    state, result = _Progress(), RunResult(out, 0, "done")
    if resume:
        _resume(cfg, out, env, folder, state, model, optimizer, scheduler, sampler, metrics)
    last_saved = state.step if resume else None

    def save() -> Path:
        nonlocal last_saved
        meta = {"best_val": state.best_val, "bad_evals": state.bad_evals, "skips": state.skips}
        meta |= {"config": cfg.to_dict(), "micro_batch_budget": budget}  # a resume packs the same bins
        path = save_checkpoint(
            out,
            state.step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler_state=sampler.state_dict(),
            meta=meta,
            keep=cfg.keep_checkpoints,
            dist=env,
        )
        last_saved = state.step
        return path

    batches = _micro_batches(sampler)
    stop_signal = None
    with _StopFlag() as stop:
        while state.step < total_steps:
            t0 = time.perf_counter()
            bins = [next(batches) for _ in range(per_step)]
            micro, n_targets, tokens = one_step.step_batches(train, bins, budget, env, device)
            r = one_step.train_step(
                par,
                micro,
                optimizer,
                scheduler,
                params=trainable,
                targets=n_targets,
                tokens=tokens,
                precision=cfg.precision,
                grad_clip=cfg.optim.grad_clip,
                device=device,
                env=env,
                stop_requested=lambda: bool(stop.signal),
            )
            if r.stop:
                stop_signal = stop.signal or "a signal on another rank"
            state.step += 1
            if not r.finite and _skip_or_stop(cfg, state, r, out, env, metrics):
                continue  # train_step made no update; skipping (or stopping) is the run's policy
            record = r.record(state.step, time.perf_counter() - t0, fpt, peak, env.world_size, device)
            result.losses.append(r.loss)
            if state.step % cfg.eval_every == 0 or state.step == total_steps:
                _validate(state, result, record, evaluate(model, data["val"], cfg, device, env, par))
            metrics.step(record)
            if on_step is not None:
                on_step(state.step, record)
            if _early_stop(cfg, state):
                result.stopped = "early_stopping"
                break
            if not env.enabled:  # one process: a signal during this step stops it now
                stop_signal = stop.signal
            if stop_signal:
                result.stopped = "signal"
                break
            if state.step % cfg.save_every == 0:
                save()
    metrics.close()
    result.step = state.step
    if last_saved != state.step:
        save()
    if result.stopped == "signal":
        if env.is_main:
            print(
                f"\nstopped by {stop_signal} after step {state.step}; checkpoint "
                f"{out / 'checkpoints'}/step-{state.step:08d}. Resume with the same command and --resume.",
                flush=True,
            )
        return result
    result.test_loss = evaluate(model, data["test"], cfg, device, env, par)
    final = consolidate(par, env, cfg)  # the whole model on rank 0 (FSDP gathers it to host memory)
    if env.is_main:
        _finish(cfg, final, tokenizer, data, next(final.parameters()).device, out, result)
    return result


def _resume(
    cfg, out: Path, env: Dist, folder, state: _Progress, model, optimizer, scheduler, sampler, metrics
):
    """Load the newest complete checkpoint into the model, optimizer, scheduler, sampler and `state`."""
    ckpt, why = find_latest(out)
    if ckpt is None:
        raise FasttuneError(f"--resume: {why}")
    meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, dist=env)
    # a changed config (allowed or an extension) goes on from here with its own hyperparameters; a new
    # seed continues at the saved position, in the new seed's order of bins
    reapply = folder.reapply
    sampler.load_state_dict({**meta["sampler"], "seed": cfg.seed} if reapply else meta["sampler"])
    if reapply:
        config_diff.reapply_hyperparameters(cfg, optimizer, scheduler)
    state.step, state.best_val, state.bad_evals = meta["step"], meta["best_val"], meta["bad_evals"]
    state.skips = meta["skips"]
    folder.start()  # the checkpoint loaded: only now is anything in the folder rewritten
    metrics.drop_after(state.step)
    if env.is_main:
        print(f"resuming from {why}, step {state.step}", flush=True)


def _skip_or_stop(cfg: RunConfig, state: _Progress, r, out: Path, env: Dist, metrics) -> bool:
    """A non-finite step: True to skip it (up to `nonfinite_skips` in a run), else NonFiniteError."""
    what = f"loss {r.loss}, gradient norm {r.grad_norm}"
    if state.skips < cfg.nonfinite_skips:
        state.skips += 1
        log.warning(
            "step %d: non-finite %s; step skipped (%d of %d allowed)",
            state.step,
            what,
            state.skips,
            cfg.nonfinite_skips,
        )
        return True
    metrics.close()
    raise NonFiniteError(
        f"step {state.step}: non-finite {what}; stopped before the optimizer step. " + resume_advice(out, env)
    )


def _validate(state: _Progress, result: RunResult, record: dict, val: float | None) -> None:
    """The validation loss into the step's record and the early-stopping count."""
    if val is None:
        return
    record.update(val_loss=val, val_ppl=math.exp(min(val, 50)))
    result.val_loss = val
    if val < state.best_val:
        state.best_val, state.bad_evals = val, 0
    else:
        state.bad_evals += 1


def _early_stop(cfg: RunConfig, state: _Progress) -> bool:
    if cfg.early_stopping is None or state.bad_evals < cfg.early_stopping:
        return False
    log.warning(
        "early stopping at step %d: %d evaluations without a better validation loss",
        state.step,
        state.bad_evals,
    )
    return True


def consolidate(par: Parallel, env: Dist, cfg: RunConfig) -> CausalLM | None:
    """The unsharded model for export: the model itself for one process or DDP; under FSDP every rank
    sends its shards and rank 0 assembles a full copy in host memory (others get None)."""
    if par.strategy != "fsdp":
        return par.model if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(
        par.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not env.is_main:
        return None
    with torch.device("meta"):
        full = CausalLM(par.model.config)
        if cfg.method != "full":
            from fasttune.models.lora import apply_lora

            apply_lora(full, cfg.lora.to_lora_config())
    full.load_state_dict(full_state, assign=True)
    full.tie_weights()
    full.model.inv_freq = rope_inv_freq(full.model.rope_config)  # a buffer not in the state dict
    full.info = dataclasses.replace(par.model.info)  # its source folder and generation config
    apply_kernels(full, "torch", torch.device("cpu"))
    return full


def _finish(cfg, model, tokenizer, data, device, out: Path, result: RunResult) -> None:
    """Test loss (computed by every rank before), the exported model, a few samples. Rank 0 only."""
    if result.test_loss is not None:
        print(f"test loss {result.test_loss:.4f} (perplexity {math.exp(min(result.test_loss, 50)):.2f})")
    save_dtype = parse_dtype(model.config.hf.get("dtype") or model.config.hf.get("torch_dtype") or "float32")
    if cfg.method in ("lora", "qlora"):
        from fasttune.models.lora import save_adapter

        base = cfg.model or str(out / "base_model")
        save_adapter(model, out / "adapter", base_model_path=str(Path(base).resolve()))
        tokenizer.save(out / "adapter")
        print(f"adapter: {out / 'adapter'} (PEFT format, base {base})")
        if cfg.lora.merge:  # the export's merge: into the base read fresh (not the bf16/NF4 copy trained on)
            from fasttune.models.merge import merge_to_folder

            merge_to_folder(base, out / "adapter", out / "merged", tokenizer=tokenizer, dtype=save_dtype)
            saved_as = _dtype_name(save_dtype)
            print(f"merged model: {out / 'merged'} (base + adapter in fp32, saved as {saved_as})")
    else:
        save_model(model, out / "model", tokenizer=tokenizer, dtype=save_dtype)
        print(f"model: {out / 'model'} (Hugging Face format)")
    if len(data["test"]) and (cfg.samples or cfg.eval_examples):
        _report(cfg, model, tokenizer, out, result)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _report(cfg, model, tokenizer, out: Path, result: RunResult) -> None:
    """Generations for the test prompts (KV-cache greedy) and their metrics in OUT/eval.json; the first
    `samples` are printed."""
    from fasttune.eval.evaluate import evaluate_run

    report = evaluate_run(
        model,
        tokenizer,
        out / "data",
        micro_batch_tokens=cfg.micro_batch_tokens,
        autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
        max_examples=max(cfg.eval_examples, cfg.samples),
        max_new_tokens=64,
        seed=cfg.seed,
        out=out / "eval.json",
        loss=result.test_loss,  # measured a moment ago over the same split
    )
    m = report["metrics"]
    cover = m.get("template_coverage")
    print(
        f"evaluation on {m['examples']} test prompts ({out / 'eval.json'}): "
        f"distinct-1 {m['distinct_1']:.3f}, distinct-2 {m['distinct_2']:.3f}, "
        f"mean length {m['mean_tokens']:.1f} tokens, "
        f"memorised {m['memorised']:.1%}"
        + (
            f", template coverage {cover['coverage']:.1%}"
            if isinstance(cover, dict) and cover.get("coverage") is not None
            else ""
        )
    )
    for g in report["generations"][: cfg.samples]:
        result.samples.append((g["instruction"], g["generation"]))
        print(f"  {g['instruction']}\n    -> {g['generation']}")
