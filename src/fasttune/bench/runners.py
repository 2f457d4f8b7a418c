"""The end-to-end contestants, each training the same model on the same examples, step for step.

The workload is the reference recipe's: 32 examples per optimizer step, truncated at 128 tokens. Every
runner takes the same step plan (which examples form each step), so their loss curves are comparable
step by step, and measures the same things:

  hf_padded        transformers, SDPA, the 32 examples padded to the longest (TRL's default collation),
                   torch AdamW (fused on CUDA): the recipe as users run it.
  hf_padding_free  transformers, the 32 examples flattened into one row with restarting position_ids
                   (transformers derives the block-diagonal mask from them), Liger-Kernel's kernels when
                   installed: the strongest Hugging Face setup available.
  fasttune         the step's examples packed into one row padded to a fixed bucket (static shapes for
                   torch.compile), trained as `fasttune run` trains: the model, optimizer and schedule
                   from train/setup.py (fp32 master weights, bf16 autocast for bfloat16),
                   each step through fasttune.train.step.train_step (the non-finite guard included). The
                   variants differ from `fasttune run` only by config (kernels, compile, LoRA).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fasttune.data.packing import TokenizedData, collate
from fasttune.train.config import LoraSettings, OptimConfig, RunConfig, validate
from fasttune.train.metrics import flops_per_token, peak_flops

BATCH = 32
MAX_LEN = 128


@dataclass
class StepPlan:
    steps: list[list[int]]  # example indices of each step
    bucket: int  # fasttune's fixed row length: the largest step, rounded up to a multiple of 256

    @classmethod
    def make(cls, data: TokenizedData, tokens: int, seed: int = 0) -> StepPlan:
        order = np.random.default_rng(seed).permutation(len(data)).tolist()
        steps, total = [], 0
        while total < tokens:
            if not order:
                order = np.random.default_rng(seed + len(steps)).permutation(len(data)).tolist()
            step, order = order[:BATCH], order[BATCH:]
            steps.append(step)
            total += int(data.lengths[step].sum())
        longest = max(int(data.lengths[s].sum()) for s in steps)
        return cls(steps, math.ceil(longest / 256) * 256)


@dataclass
class Result:
    name: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    targets: int = 0  # per measured step, summed
    real_tokens: int = 0
    computed_tokens: int = 0  # including padding
    peak_memory_gib: float | None = None
    first_step_s: float = 0.0  # includes compilation and warm-up allocations
    extra: dict = field(default_factory=dict)

    def summary(self, flops: float, peak: float | None) -> dict:
        seconds = sum(self.step_seconds)
        real_tps = self.real_tokens / seconds if seconds else 0.0
        return {
            "steps_measured": len(self.step_seconds),
            "step_ms_median": 1e3 * statistics.median(self.step_seconds) if self.step_seconds else None,
            "steps_per_s": len(self.step_seconds) / seconds if seconds else None,
            "target_tokens_per_s": self.targets / seconds if seconds else None,
            "real_tokens_per_s": real_tps,
            "token_efficiency": self.real_tokens / self.computed_tokens if self.computed_tokens else None,
            "peak_memory_gib": self.peak_memory_gib,
            "mfu": real_tps * flops / peak if peak else None,
            "final_loss": statistics.fmean(self.losses[-5:]) if self.losses else None,
            "first_step_s": self.first_step_s,
            **self.extra,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_loop(name, plan: StepPlan, step_fn, device, warmup: int) -> Result:
    """Run step_fn(i) for every planned step; the first `warmup` are not measured."""
    result = Result(name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(len(plan.steps)):
        _sync(device)
        t0 = time.perf_counter()
        loss, targets, real, computed = step_fn(i)
        _sync(device)
        dt = time.perf_counter() - t0
        result.losses.append(loss)
        if i == 0:
            result.first_step_s = dt
        if i >= warmup:
            result.step_seconds.append(dt)
            result.targets += targets
            result.real_tokens += real
            result.computed_tokens += computed
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _adamw(params, lr, device):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda" or None)


def _schedule(opt, steps):
    import transformers

    return transformers.get_cosine_schedule_with_warmup(opt, max(1, round(0.05 * steps)), steps)


def run_hf(
    model_dir,
    data: TokenizedData,
    plan: StepPlan,
    device,
    dtype,
    padding_free: bool,
    warmup: int,
    lr: float = 2e-5,
    liger: bool = False,
) -> Result:
    import transformers

    if liger:
        from liger_kernel.transformers import AutoLigerKernelForCausalLM as Auto
    else:
        Auto = transformers.AutoModelForCausalLM
    model = Auto.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    opt = _adamw(model.parameters(), lr, device)
    sched = _schedule(opt, len(plan.steps))
    pad = 0

    def step(i):
        seqs = [(s.astype(np.int64), m) for s, m in (data.sequence(j) for j in plan.steps[i])]
        if padding_free:
            ids = np.concatenate([s for s, _ in seqs])[None]
            labels = np.concatenate([np.where(m.astype(bool), s, -100) for s, m in seqs])[None]
            pos = np.concatenate([np.arange(len(s)) for s, _ in seqs])[None]
            batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        else:
            n = max(len(s) for s, _ in seqs)
            ids = np.full((len(seqs), n), pad)
            labels = np.full((len(seqs), n), -100)
            att = np.zeros((len(seqs), n))
            for r, (s, m) in enumerate(seqs):
                ids[r, : len(s)], att[r, : len(s)] = s, 1
                labels[r, : len(s)] = np.where(m.astype(bool), s, -100)
            batch = {"input_ids": ids, "labels": labels, "attention_mask": att}
        batch = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)).to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        real = sum(len(s) for s, _ in seqs)
        targets = int(sum(m[1:].sum() for _, m in seqs))
        return loss.item(), targets, real, batch["input_ids"].numel()

    name = "hf_padding_free" + ("+liger" if liger else "") if padding_free else "hf_padded"
    return _timed_loop(name, plan, step, device, warmup)


def fasttune_config(
    model_dir, dtype, kernels: str, compile: bool, lora: bool, lr: float, device, steps: int
) -> RunConfig:
    """The `fasttune run` config of a fasttune variant: the benchmark's recipe (AdamW, weight decay
    0.01, cosine with 5% warmup, clip 1.0) as `fasttune run` keys. bf16 is fasttune's bf16 precision (fp32
    master weights, bf16 autocast), float32 is fp32."""
    cfg = RunConfig(
        model=str(model_dir),
        method="lora" if lora else "full",
        kernels=kernels,
        precision="bf16" if dtype == torch.bfloat16 else "fp32",
        device=str(device),
        compile=compile,
    )
    # `_schedule`'s warmup, max(1, round(5% of the steps)), as the fraction `fasttune run` takes (it warms
    # up round(fraction x steps)): a short plan still warms up one step, as the baseline does. Below 1,
    # as the config requires: round(0.999 x 1) is 1.
    warmup = min(max(1, round(0.05 * steps)) / steps, 0.999)
    cfg.optim = OptimConfig(lr=2e-4 if lora else lr, weight_decay=0.01, warmup=warmup, grad_clip=1.0)
    cfg.lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    validate(cfg)
    return cfg


def run_fasttune(
    model_dir,
    data: TokenizedData,
    plan: StepPlan,
    device,
    dtype,
    warmup: int,
    *,
    kernels: str = "auto",
    compile: bool = False,
    lora: bool = False,
    pack: bool = True,
    lr: float = 2e-5,
) -> Result:
    """The variant as `fasttune run` trains it: model, strategy, optimizer and schedule from
    train/setup.py, every step through `fasttune.train.step.train_step` (autocast, guard and all). A
    non-finite step stops the variant with NonFiniteError, as `fasttune run` with nonfinite_skips=0
    stops."""
    import tempfile

    from fasttune.models.tokenizer import load_tokenizer
    from fasttune.train import loop, setup
    from fasttune.train import step as one_step
    from fasttune.train.distributed import SINGLE

    device = torch.device(device)
    cfg = fasttune_config(model_dir, dtype, kernels, compile, lora, lr, device, len(plan.steps))
    with tempfile.TemporaryDirectory() as out:  # build_parallel's run folder: unused for a model folder
        par = setup.build_parallel(cfg, load_tokenizer(model_dir), device, Path(out), SINGLE)
    model = par.model
    model.train()
    optimizer, scheduler = setup.build_optimizer(cfg, model, device, len(plan.steps))
    params = [p for p in model.parameters() if p.requires_grad]
    name = "fasttune" + ("_lora" if lora else "") + f"_{model.info.kernels}" + ("_compile" if compile else "")

    def step(i):
        idx = plan.steps[i]
        # pack=False is the deliberate regression the gate must catch: each example alone, padded to 128.
        rows = (
            [collate(data, idx, pad_to=plan.bucket)]
            if pack
            else [collate(data, [j], pad_to=MAX_LEN) for j in idx]
        )
        r = one_step.train_step(
            par,
            [b.to(device) for b in rows],
            optimizer,
            scheduler,
            params=params,
            targets=sum(b.num_targets for b in rows),
            tokens=sum(b.num_tokens for b in rows),
            precision=cfg.precision,
            grad_clip=cfg.optim.grad_clip,
            device=device,
        )
        if not r.finite:
            raise loop.NonFiniteError(
                f"{name}: step {i + 1}: non-finite loss {r.loss}, gradient norm {r.grad_norm}; "
                "stopped before the optimizer step"
            )
        return r.loss, r.targets, r.tokens, sum(b.input_ids.numel() for b in rows)

    result = _timed_loop(name, plan, step, device, warmup)
    if compile:
        from torch._dynamo.utils import counters

        result.extra["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        result.extra["graph_breaks"] = int(sum(counters["graph_break"].values()))
    result.extra["flops_per_token"] = flops_per_token(model, float(np.mean(data.lengths)), lora=lora)
    return result


def peak_for(device) -> float | None:
    return peak_flops(torch.device(device))
