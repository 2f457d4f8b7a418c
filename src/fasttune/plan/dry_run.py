"""`fasttune run --dry-run`: what a run config would train, without training it: a tokenized example, the
tokens per example, the model built on the meta device (parameter counts, LoRA applied) and the plan
(memory per GPU, time per epoch: plan/estimate.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from fasttune.data import synth
from fasttune.data.packing import TokenizeOptions, tokenize, with_system_prompt
from fasttune.data.records import Example, Source, read_sources
from fasttune.models import builtin
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.models.tokenizer import builtin_tokenizer, format_mask, load_tokenizer
from fasttune.models.weights import read_config
from fasttune.plan.estimate import plan_for_run, resolve_model

SAMPLE_EXAMPLES = 64  # the examples tokenized for the lengths: enough for a mean, quick to read


def dry_run(cfg, nproc: int = 1, gpu: str | None = None, shape: str | None = None) -> str:
    """The dry run's report for `cfg` (a RunConfig) as text. The plan is for `gpu` (default: the one here,
    else an RTX 4090). `shape`: a named shape (qwen2.5-7b, ...) planned without weights, rendered with the
    bundled Qwen2.5 tokenizer."""
    examples = _sample_examples(cfg)
    tok, mcfg = _tokenizer_and_config(cfg, shape, examples)
    opts = TokenizeOptions(cfg.data.max_seq_len, "truncate", cfg.data.system_prompt, cfg.data.train_on_input)
    data, _ = tokenize(examples, tok, opts)
    enc = tok.encode_chat(with_system_prompt(examples[0].messages, cfg.data.system_prompt, tok))
    lines = [
        f"example ({len(enc.ids)} tokens, trained tokens in [[...]]):",
        "  " + format_mask(tok, enc).replace("\n", "\n  "),
        f"tokens per example over {len(data)} examples: mean {data.lengths.mean():.1f}, "
        f"max {data.lengths.max()}",
        _parameter_line(cfg, mcfg),
    ]
    name = shape or (Path(cfg.model).name if cfg.model else "built-in tiny Qwen2")
    lines.append(plan_for_run(cfg, mcfg, name, nproc, gpu, float(data.lengths.mean()), _epoch_examples(cfg)))
    return "\n".join(lines)


def _sample_examples(cfg) -> list[Example]:
    """The first examples of the run's first data file, or of the built-in corpus without files."""
    if cfg.data.files:
        examples, _ = read_sources([Source(cfg.data.files[0], cfg.data.format)])
        return examples[:SAMPLE_EXAMPLES]
    return [
        Example([{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}])
        for r in synth.generate(SAMPLE_EXAMPLES, cfg.seed)
    ]


def _tokenizer_and_config(cfg, shape: str | None, examples: list[Example]):
    """(tokenizer, ModelConfig): a named shape's with the bundled tokenizer, the model folder's, or the
    built-in tiny model's with a tokenizer trained on the examples (as a run without a model builds it)."""
    if shape is not None:
        return builtin_tokenizer(), resolve_model(shape)[0]
    if cfg.model is not None:
        return load_tokenizer(cfg.model), read_config(cfg.model)
    tok = builtin.train_tokenizer([m["content"] for e in examples for m in e.messages], vocab_size=512)
    return tok, ModelConfig.from_hf(builtin.tiny_config(tok), "built-in tiny Qwen2")


def _parameter_line(cfg, mcfg: ModelConfig) -> str:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = CausalLM(mcfg)
    total = trainable = model.num_parameters()
    if cfg.method in ("lora", "qlora"):
        from fasttune.models.lora import apply_lora, count_parameters

        apply_lora(model, cfg.lora.to_lora_config())
        trainable, total = count_parameters(model)
    return (
        f"model: {mcfg.model_type}, {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({cfg.method})"
    )


def _epoch_examples(cfg) -> int:
    """Examples per epoch: the built-in corpus's size, or every file's count times its weight."""
    if not cfg.data.files:
        return round(cfg.data.synth_n)
    weights = cfg.data.weights or [1.0] * len(cfg.data.files)
    counts = [len(read_sources([Source(f, cfg.data.format)])[0]) for f in cfg.data.files]
    return round(sum(c * w for c, w in zip(counts, weights, strict=True)))
