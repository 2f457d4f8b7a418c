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
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttune import regions
from fasttune.data import corpus, synth
from fasttune.data.packing import (
    Batch,
    PackedSampler,
    TokenizedData,
    TokenizeOptions,
    collate,
    tokenizer_fingerprint,
)
from fasttune.data.records import Source, write_jsonl
from fasttune.devices import resolve_device
from fasttune.errors import FasttuneError
from fasttune.models import builtin
from fasttune.models.attention import set_attention_backend
from fasttune.models.kernels import apply_kernels
from fasttune.models.model import CausalLM, rope_inv_freq
from fasttune.models.tokenizer import Tokenizer, load_tokenizer
from fasttune.models.weights import check_checkpoint, load_model, load_sharded, parse_dtype, save_model
from fasttune.train import config_diff, distributed, run_folder
from fasttune.train import step as one_step
from fasttune.train.checkpoint import find_latest, load_checkpoint, resume_advice, save_checkpoint
from fasttune.train.config import RunConfig
from fasttune.train.distributed import SINGLE, Dist, all_reduce_sum, barrier
from fasttune.train.metrics import MetricsLog, flops_per_token, peak_flops
from fasttune.train.parallelize import Parallel, choose_strategy, init_lora_sharded, parallelize, shard_fsdp

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
# Set-up: tokenizer, data, model, optimizer


def build_tokenizer(cfg: RunConfig, out: Path, corpus_file: Path | None) -> Tokenizer:
    if cfg.model is not None:
        return load_tokenizer(cfg.model)
    saved = out / "tokenizer"
    if (saved / "tokenizer.json").exists():  # a resumed built-in run keeps the tokenizer it trained
        return load_tokenizer(saved)
    examples, _ = corpus.read_sources([str(corpus_file)])
    texts = [m["content"] for e in examples for m in e.messages]
    tok = builtin.train_tokenizer(texts)
    tok.save(saved)
    return tok


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer, out: Path, corpus_file: Path | None) -> dict:
    """Tokenized train/val/test under out/data, prepared once: a resumed run reuses them when the
    tokenizer and the data options are the same."""
    data_dir = out / "data"
    opts = corpus.PrepareOptions(
        ratios=tuple(cfg.data.split),
        seed=cfg.seed,
        stratify_key=cfg.data.stratify,
        skip_bad=cfg.data.skip_bad,
        budget=cfg.micro_batch_tokens,
        tokenize=TokenizeOptions(
            cfg.data.max_seq_len, cfg.data.too_long, cfg.data.system_prompt, cfg.data.train_on_input
        ),
    )
    files = [str(corpus_file)] if corpus_file else cfg.data.files
    weights = cfg.data.weights or [1.0] * len(files)
    sources = [Source(f, cfg.data.format, w) for f, w in zip(files, weights, strict=True)]
    report_file = data_dir / "prepare.json"
    same = False
    if report_file.exists():
        old = json.loads(report_file.read_text())
        same = (
            old.get("tokenizer") == tokenizer_fingerprint(tokenizer)
            and old.get("files") == files
            and old.get("options") == json.loads(json.dumps(dataclasses.asdict(opts)))
        )
    if not same:
        r = corpus.prepare(sources, data_dir, tokenizer, opts)
        log.info(
            "prepared %d train / %d val / %d test examples; packing %.1f%% at %d tokens",
            r["splits"]["train"]["examples"],
            r["splits"]["val"]["examples"],
            r["splits"]["test"]["examples"],
            100 * r["packing"]["efficiency"],
            cfg.micro_batch_tokens,
        )
    return {s: TokenizedData.load(data_dir / "tokenized" / s) for s in ("train", "val", "test")}


def build_model(
    cfg: RunConfig, tokenizer: Tokenizer, device: torch.device, out: Path, is_main: bool = True
) -> CausalLM:
    if cfg.method == "qlora":  # NF4 base quantised layer by layer as it is read, fp32 adapters (qlora.py)
        from fasttune.models.qlora import build_for_run

        return build_for_run(cfg, tokenizer, device, out)
    pure = cfg.precision == "bf16-pure"
    lora_base_bf16 = cfg.method == "lora" and cfg.precision != "fp32"
    # Full fine-tunes keep fp32 master weights unless pure bf16; LoRA's frozen base can be bf16 at once.
    dtype = torch.bfloat16 if (pure or lora_base_bf16) else torch.float32
    if cfg.model is not None:
        model = load_model(cfg.model, dtype=dtype, device=device)
    else:
        model = builtin.tiny_model(tokenizer, cfg.seed).to(device=device, dtype=dtype)
        if cfg.method == "lora" and is_main:  # this base exists only in this run: the adapter needs it
            save_model(model, out / "base_model", tokenizer=tokenizer)
    if cfg.method == "lora":
        from fasttune.models.lora import apply_lora

        targets = apply_lora(model, cfg.lora.to_lora_config())
        log.info("LoRA r=%d alpha=%g on %d modules", cfg.lora.r, cfg.lora.alpha, len(targets))
    apply_kernels(model, cfg.kernels, device)  # after LoRA, so the adapters follow the choice too
    set_attention_backend(model, cfg.attention, device, one_step.compute_dtype(cfg.precision))
    return model


def _meta_model(cfg: RunConfig) -> CausalLM:
    """The model's structure with no storage (for sizes, and for the sharded load), in training dtypes."""
    model = check_checkpoint(cfg.model).meta_model
    if cfg.precision == "bf16-pure" or (cfg.method != "full" and cfg.precision != "fp32"):
        model = model.to(torch.bfloat16)
    if cfg.method != "full":
        from fasttune.models.lora import apply_lora

        apply_lora(model, cfg.lora.to_lora_config())
    return model


def build_sharded_model(cfg: RunConfig, device: torch.device, env: Dist) -> CausalLM:
    """FSDP from a checkpoint folder without ever holding the whole model on one rank: the structure is
    built on the meta device and sharded, each rank allocates only its shards, and each rank reads only
    its slices of the safetensors files (weights.load_sharded). LoRA adapters are initialised as in one
    process (same seed, same values) and then sharded."""
    model = _meta_model(cfg)
    shard_fsdp(model, device, cfg.precision, cfg.cpu_offload, env.world_size)
    model.to_empty(device=device)  # also recomputes RoPE's fp32 frequencies (Decoder._apply)
    load_sharded(model, cfg.model)
    if cfg.method != "full":
        init_lora_sharded(model)
    apply_kernels(model, cfg.kernels, device)
    set_attention_backend(model, cfg.attention, device, one_step.compute_dtype(cfg.precision))
    return model


def build_parallel(cfg: RunConfig, tokenizer: Tokenizer, device: torch.device, out: Path, env: Dist):
    """The model on this rank, with the strategy (single, ddp or fsdp) applied."""
    sharded = False
    if env.enabled and cfg.method == "qlora":
        raise FasttuneError("method qlora runs in one process: launch it without torchrun / --nproc")
    if cfg.model is None:  # the built-in tiny model: every rank builds the same one from the seed
        model = build_model(cfg, tokenizer, device, out, env.is_main)
        strategy = choose_strategy(cfg.strategy, model, device, cfg.precision, env)
    else:
        strategy = (
            choose_strategy(cfg.strategy, _meta_model(cfg), device, cfg.precision, env)
            if env.enabled
            else "single"
        )
        if strategy == "fsdp":
            model, sharded = build_sharded_model(cfg, device, env), True
        else:
            model = build_model(cfg, tokenizer, device, out, env.is_main)
    if env.enabled and env.rank > 0:  # the model is identical on every rank; dropout streams are not
        torch.manual_seed(cfg.seed * 1_000_003 + env.rank)
    if regions.REGIONS_ON:  # under `fasttune profile`: name the model's parts in the trace
        regions.mark_regions(model)
    return parallelize(
        model,
        cfg.activation_checkpointing,
        cfg.compile,
        dist=env,
        strategy=strategy,
        precision=cfg.precision,
        cpu_offload=cfg.cpu_offload,
        device=device,
        sharded=sharded,
    )


def build_optimizer(cfg: RunConfig, model: CausalLM, device: torch.device, total_steps: int):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused or None
    )
    log.info("AdamW: %s", "fused (CUDA)" if fused else "foreach (fused AdamW is used on CUDA only)")
    warmup = round(cfg.optim.warmup * total_steps)
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:  # the schedule of transformers' get_*_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.schedule == "constant":
            return 1.0
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.optim.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * max(0.0, shape)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bins = PackedSampler(data.lengths, cfg.micro_batch_tokens, seed=cfg.seed).bins()
    for first in range(0, len(bins), env.world_size):
        j = first + env.rank
        b = collate(data, bins[j if j < len(bins) else env.rank % len(bins)], pad_to=cfg.micro_batch_tokens)
        b = b.to(device)
        with _autocast(cfg, device, par):
            loss = _loss(model, b).float().item()
        if j < len(bins):
            total += loss * b.num_targets
            count += b.num_targets
    if env.enabled:
        both = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
        total, count = float(both[0]), int(both[1])
    model.train(was_training)
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


def _run(
    cfg: RunConfig, resume: bool, on_step, out: Path, device: torch.device, env: Dist, folder
) -> RunResult:
    reapply = folder.reapply
    torch.manual_seed(cfg.seed)
    tokenizer, data = _prepare_inputs(cfg, out, env)
    par = build_parallel(cfg, tokenizer, device, out, env)
    model = par.model
    model.train()

    train = data["train"]
    W = env.world_size
    layout = distributed.split_global_batch(
        cfg.tokens_per_step,
        cfg.micro_batch_tokens,
        cfg.data.max_seq_len,
        W,
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

    step, best_val, bad_evals, skips, result = 0, math.inf, 0, 0, RunResult(out, 0, "done")
    metrics = (
        MetricsLog(out, total_steps, cfg.log_every, cfg.tensorboard, resume=resume)
        if env.is_main
        else (_NoMetrics())
    )
    if resume:
        ckpt, why = find_latest(out)
        if ckpt is None:
            raise FasttuneError(f"--resume: {why}")
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, dist=env)
        # a changed config (allowed or an extension) goes on from here with its own hyperparameters; a new
        # seed continues at the saved position, in the new seed's order of bins
        sampler.load_state_dict({**meta["sampler"], "seed": cfg.seed} if reapply else meta["sampler"])
        if reapply:
            config_diff.reapply_hyperparameters(cfg, optimizer, scheduler)
        step, best_val, bad_evals, skips = meta["step"], meta["best_val"], meta["bad_evals"], meta["skips"]
        folder.start()  # the checkpoint loaded: only now is anything in the folder rewritten
        metrics.drop_after(step)
        if env.is_main:
            print(f"resuming from {why}, step {step}", flush=True)
    last_saved = step if resume else None

    def save() -> Path:
        nonlocal last_saved
        meta = {"best_val": best_val, "bad_evals": bad_evals, "skips": skips, "config": cfg.to_dict()}
        meta["micro_batch_budget"] = budget  # a resume packs the same bins (run_folder.saved_budget)
        path = save_checkpoint(
            out,
            step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler_state=sampler.state_dict(),
            meta=meta,
            keep=cfg.keep_checkpoints,
            dist=env,
        )
        last_saved = step
        return path

    batches = _micro_batches(sampler)
    stop_signal = None
    with _StopFlag() as stop:
        while step < total_steps:
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
            step_loss, grad_norm = r.loss, r.grad_norm
            step += 1
            if not r.finite:  # train_step made no update; skipping or stopping is the run's policy
                what = f"loss {step_loss}, gradient norm {grad_norm}"
                if skips < cfg.nonfinite_skips:
                    skips += 1
                    log.warning(
                        "step %d: non-finite %s; step skipped (%d of %d allowed)",
                        step,
                        what,
                        skips,
                        cfg.nonfinite_skips,
                    )
                    continue
                metrics.close()
                raise NonFiniteError(
                    f"step {step}: non-finite {what}; stopped before the optimizer step. "
                    + resume_advice(out, env)
                )
            record = r.record(step, time.perf_counter() - t0, fpt, peak, W, device)
            result.losses.append(step_loss)
            if step % cfg.eval_every == 0 or step == total_steps:
                val = evaluate(model, data["val"], cfg, device, env, par)
                if val is not None:
                    record.update(val_loss=val, val_ppl=math.exp(min(val, 50)))
                    result.val_loss = val
                    if val < best_val:
                        best_val, bad_evals = val, 0
                    else:
                        bad_evals += 1
            metrics.step(record)
            if on_step is not None:
                on_step(step, record)
            if cfg.early_stopping is not None and bad_evals >= cfg.early_stopping:
                result.stopped = "early_stopping"
                log.warning(
                    "early stopping at step %d: %d evaluations without a better validation loss",
                    step,
                    bad_evals,
                )
                break
            if not env.enabled:  # one process: a signal during this step stops it now
                stop_signal = stop.signal
            if stop_signal:
                result.stopped = "signal"
                break
            if step % cfg.save_every == 0:
                save()
    metrics.close()
    result.step = step
    if last_saved != step:
        save()
    if result.stopped == "signal":
        if env.is_main:
            print(
                f"\nstopped by {stop_signal} after step {step}; checkpoint "
                f"{out / 'checkpoints'}/step-{step:08d}. Resume with the same command and --resume.",
                flush=True,
            )
        return result
    result.test_loss = evaluate(model, data["test"], cfg, device, env, par)
    final = consolidate(par, env, cfg)  # the whole model on rank 0 (FSDP gathers it to host memory)
    if env.is_main:
        _finish(cfg, final, tokenizer, data, next(final.parameters()).device, out, result)
    return result


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
