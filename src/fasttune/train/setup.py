"""A run's set-up: the tokenizer, the prepared data, the model with its method (full, LoRA, QLoRA), ops
and attention backend, the strategy applied (single, DDP, FSDP), and the optimizer with its schedule.
`fasttune run` (train/loop.py) and `fasttune bench` build through these, so both train the same thing."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from fasttune import regions
from fasttune.data import corpus
from fasttune.data.packing import (
    TokenizedData,
    TokenizeOptions,
    tokenizer_fingerprint,
)
from fasttune.data.records import Source
from fasttune.errors import FasttuneError
from fasttune.models import builtin
from fasttune.models.attention import set_attention_backend
from fasttune.models.kernels import apply_kernels
from fasttune.models.model import CausalLM
from fasttune.models.tokenizer import Tokenizer, load_tokenizer
from fasttune.models.weights import check_checkpoint, load_model, load_sharded, save_model
from fasttune.train import step as one_step
from fasttune.train.config import RunConfig
from fasttune.train.distributed import Dist
from fasttune.train.parallelize import choose_strategy, init_lora_sharded, parallelize, shard_fsdp

log = logging.getLogger("fasttune")


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
