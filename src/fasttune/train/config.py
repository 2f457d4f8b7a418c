"""The run configuration: nested dataclasses, a YAML file, `key=value` overrides and `~key` resets.

    fasttune run recipe.yaml max_steps=20 optim.lr=1e-4 lr=1e-4 ~max_steps

A key is a dotted path (`optim.lr`) or, when the name is unique across sections, just the leaf (`lr`).
Values are read as YAML scalars or lists (`20`, `1e-4`, `null`, `[q_proj, v_proj]`). `~key` puts a key back
to its default. Every key is checked: an unknown one is an error that suggests the closest known name, and
each value must have its field's type. The defaults follow the reference recipe (Qwen2.5-0.5B-Instruct,
full fine-tune, AdamW lr 2e-5, cosine with 5% warmup, weight decay 0.01, 3 epochs, bf16, clip 1.0,
validation every 100 steps, a checkpoint every 500).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fasttune.choices import ATTENTION, KERNELS, METHODS, PRECISIONS, SCHEDULES, STRATEGIES
from fasttune.errors import ConfigError

# Test prompts generated for by a run's end-of-run evaluation and by `fasttune eval` unless told otherwise:
# enough for stable distinct-n and memorisation shares, a few minutes at most of greedy decoding on a CPU.
EVAL_EXAMPLES = 200


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # JSONL files; empty: the built-in proverb corpus
    format: str | None = None  # io | messages | alpaca; None: detected per file
    weights: list[float] | None = None  # one per file: times each training example is seen per epoch
    synth_n: int = 36079  # size of the built-in corpus when `files` is empty
    max_seq_len: int = 2048
    too_long: str = "drop"  # drop | truncate | error
    system_prompt: str = "default"  # "default" (the template's), "none", or a text
    train_on_input: bool = False
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    stratify: str | None = "meta_template"
    skip_bad: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01  # on matrices only; norms, biases and adapters' B are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup: float = 0.05  # a fraction of the steps
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = False  # also write a merged full model beside the adapter

    def to_lora_config(self):
        """The adapters' shape as models/lora.py takes it (`merge` is the run's export choice, not theirs)."""
        from fasttune.models.lora import LoraConfig

        return LoraConfig(self.r, self.alpha, self.dropout, tuple(self.targets))


@dataclass
class RunConfig:
    model: str | None = None  # a Hugging Face folder; None: the built-in tiny Qwen2 trained from scratch
    output_dir: str = "out/run"
    method: str = "full"  # full | lora | qlora (NF4 base via bitsandbytes)
    seed: int = 0
    kernels: str = "auto"  # auto (Triton on CUDA, else PyTorch) | triton | torch; the choice is logged
    attention: str = "auto"  # auto (flash-attn where it can run, else SDPA) | sdpa | flash; logged
    precision: str = "bf16"  # bf16: fp32 master weights, bf16 compute | bf16-pure | fp32
    device: str = "auto"  # auto: cuda when available, else cpu
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    micro_batch_tokens: int = 16384  # packing budget: tokens per forward/backward
    tokens_per_step: int | None = None  # gradient accumulation up to this many tokens; None: one micro-batch
    eval_every: int = 100
    save_every: int = 500
    keep_checkpoints: int = 2
    early_stopping: int | None = None  # stop after this many evaluations without a better validation loss
    nonfinite_skips: int = 0  # non-finite loss or gradient: 0 stops; K skips up to K such steps
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block
    strategy: str = "auto"  # several processes: auto (DDP if the model fits per GPU, else FSDP) | ddp | fsdp
    cpu_offload: bool = False  # FSDP: parameters, gradients and optimizer states live on the host
    log_every: int = 10  # plain log lines (metrics.jsonl gets every step)
    tensorboard: bool = False
    samples: int = 3  # generated examples printed at the end
    eval_examples: int = EVAL_EXAMPLES  # test prompts generated for at the end (metrics in eval.json)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# What `fasttune run` with no config file trains: the built-in corpus on a tiny Qwen2 from scratch, sized
# to finish in about two minutes on 2 CPU cores. A from-scratch model needs a far larger learning rate
# than a fine-tune, and the short system prompt keeps the tiny vocabulary's sequences short.
BUILTIN_PRESET = {
    "output_dir": "out/builtin",
    "precision": "fp32",
    "max_steps": 300,
    "micro_batch_tokens": 4096,
    "eval_every": 50,
    "save_every": 100,
    "log_every": 25,
    "data.system_prompt": "none",
    "optim.lr": 3e-3,
    "optim.warmup": 0.05,
    "optim.weight_decay": 0.1,
}


def _sections(cls=RunConfig, prefix="") -> dict[str, type]:
    """Every leaf key as a dotted path -> its type hint."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_sections(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def _resolve_key(key: str, where: str) -> str:
    paths = _sections()
    if key in paths:
        return key
    by_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(by_leaf) == 1:
        return by_leaf[0]
    if len(by_leaf) > 1:
        raise ConfigError(f"{where}: '{key}' is ambiguous: use one of {', '.join(by_leaf)}")
    names = list(paths) + sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_type(value: Any, hint, path: str, where: str) -> Any:
    """The value if it fits the type hint (ints are accepted as floats), else a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], path, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path} must be a list, got {value!r}")
        return [_check_type(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: {path} must be {hint.__name__}, got {value!r}") from None
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{where}: {path} must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{where}: {path} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _set(cfg: RunConfig, path: str, value: Any, where: str) -> None:
    *sections, leaf = path.split(".")
    obj = cfg
    for s in sections:
        obj = getattr(obj, s)
    hint = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _check_type(value, hint, path, where))


def _reset(cfg: RunConfig, path: str) -> None:
    *sections, leaf = path.split(".")
    obj, fresh = cfg, RunConfig()
    for s in sections:
        obj, fresh = getattr(obj, s), getattr(fresh, s)
    setattr(obj, leaf, getattr(fresh, leaf))


def _flatten(d: dict, where: str, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in {"data", "optim", "lora"}:
            out.update(_flatten(v, where, f"{key}."))
        else:
            out[key] = v
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The resolved config: defaults (or the built-in preset when no file is given), then the YAML file,
    then the overrides in order. Raises ConfigError naming the file or override and the key."""
    cfg = RunConfig()
    if path is None:
        for key, value in BUILTIN_PRESET.items():
            _set(cfg, key, value, "built-in preset")
    else:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{file}: config file not found") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{file}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a mapping of keys to values")
        for key, value in _flatten(raw, str(file)).items():
            _set(cfg, _resolve_key(key, str(file)), value, str(file))
    for item in overrides:
        if item.startswith("~"):
            _reset(cfg, _resolve_key(item[1:], f"override '{item}'"))
            continue
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value or ~key")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, _resolve_key(key, f"override '{item}'"), value, f"override '{item}'")
    validate(cfg)
    return cfg


# Finite, plausible ranges for every numeric key: (low, high, low included, high included). Past these a
# value is a typo or an overflow, not a recipe: lr above 1 diverges AdamW at once, 1e9 steps is decades of
# GPU time, 2**24 tokens is far above what one micro-batch of the supported models fits in any GPU's
# memory, and a count this large (max_steps=1e29, epochs=1e300) would overflow the schedule's arithmetic.
BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, 2**32 - 1, True, True),  # numpy's and Python's generators take it as a 32-bit word
    "epochs": (0, 1e4, False, True),
    "max_steps": (1, 1e9, True, True),
    "micro_batch_tokens": (16, 2**24, True, True),
    "tokens_per_step": (16, 2**30, True, True),
    "eval_every": (1, 1e9, True, True),
    "save_every": (1, 1e9, True, True),
    "log_every": (1, 1e9, True, True),
    "keep_checkpoints": (2, 1000, True, True),
    "early_stopping": (1, 1e6, True, True),
    "nonfinite_skips": (0, 1e6, True, True),
    "samples": (0, 1e6, True, True),
    "eval_examples": (0, 1e7, True, True),
    "data.synth_n": (1, 1e7, True, True),
    "data.max_seq_len": (2, 2**24, True, True),  # one target needs two tokens
    "data.weights": (0, 1e3, True, True),
    "data.split": (0, 1, True, True),
    "optim.lr": (0, 1, False, True),
    "optim.weight_decay": (0, 10, True, True),
    "optim.betas": (0, 1, True, False),
    "optim.eps": (0, 1, False, True),
    "optim.warmup": (0, 1, True, False),
    "optim.min_lr_ratio": (0, 1, True, True),
    "optim.grad_clip": (0, 1e6, True, True),  # 0: no clipping
    "lora.r": (1, 4096, True, True),
    "lora.alpha": (0, 1e6, False, True),
    "lora.dropout": (0, 1, True, False),
}


def _value(cfg: RunConfig, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_bounds(cfg: RunConfig) -> None:
    """Every numeric key inside its range (BOUNDS), NaN and infinities refused, with the key and the
    range named."""
    for path, (low, high, low_in, high_in) in BOUNDS.items():
        value = _value(cfg, path)
        items = (
            [(path, value)]
            if not isinstance(value, list)
            else [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        )
        for key, v in items:
            if v is None:
                continue
            ok = (
                math.isfinite(v)
                and (low <= v if low_in else low < v)
                and (v <= high if high_in else v < high)
            )
            if not ok:
                span = f"{'[' if low_in else '('}{_number(low)}, {_number(high)}{']' if high_in else ')'}"
                raise ConfigError(f"config: {key} must be a finite number in {span}, got {v!r}")


def validate(cfg: RunConfig) -> None:
    """Values that have the right type but cannot work, each with the key named."""

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(f"config: {message}")

    need(cfg.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "qlora":  # found without importing it (importing bitsandbytes takes a second)
        from fasttune.models.qlora import INSTALL_HINT, bitsandbytes_missing

        missing = bitsandbytes_missing()
        need(missing is None, f"method qlora needs bitsandbytes ({missing}): {INSTALL_HINT}")
    need(cfg.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    need(cfg.kernels in KERNELS, f"kernels must be one of {', '.join(KERNELS)}, got {cfg.kernels!r}")
    need(
        cfg.attention in ATTENTION, f"attention must be one of {', '.join(ATTENTION)}, got {cfg.attention!r}"
    )
    need(
        cfg.precision in PRECISIONS,
        f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}",
    )
    need(cfg.optim.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}")
    need(cfg.optim.lr > 0, f"optim.lr must be positive, got {cfg.optim.lr}")
    need(
        0 <= cfg.optim.warmup < 1,
        f"optim.warmup is a fraction of the steps in [0, 1), got {cfg.optim.warmup}",
    )
    need(
        len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
        "optim.betas must be two numbers in [0, 1)",
    )
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0")
    need(cfg.epochs > 0, f"epochs must be positive, got {cfg.epochs}")
    need(cfg.max_steps is None or cfg.max_steps > 0, f"max_steps must be positive, got {cfg.max_steps}")
    need(
        cfg.micro_batch_tokens >= 16, f"micro_batch_tokens must be at least 16, got {cfg.micro_batch_tokens}"
    )
    need(
        cfg.data.max_seq_len <= cfg.micro_batch_tokens,
        f"data.max_seq_len ({cfg.data.max_seq_len}) must fit in micro_batch_tokens "
        f"({cfg.micro_batch_tokens})",
    )
    need(
        cfg.tokens_per_step is None or cfg.tokens_per_step >= cfg.micro_batch_tokens,
        "tokens_per_step must be at least micro_batch_tokens",
    )
    for key in ("eval_every", "save_every", "log_every"):
        need(getattr(cfg, key) > 0, f"{key} must be positive, got {getattr(cfg, key)}")
    need(cfg.keep_checkpoints >= 2, f"keep_checkpoints must be at least 2, got {cfg.keep_checkpoints}")
    need(cfg.nonfinite_skips >= 0, "nonfinite_skips must be >= 0")
    need(cfg.samples >= 0 and cfg.eval_examples >= 0, "samples and eval_examples must be >= 0")
    need(
        cfg.data.weights is None or len(cfg.data.weights) == len(cfg.data.files),
        f"data.weights has {len(cfg.data.weights or [])} value(s) for {len(cfg.data.files)} file(s)",
    )
    need(
        len(cfg.data.split) == 3 and abs(sum(cfg.data.split) - 1) < 1e-6 and min(cfg.data.split) >= 0,
        f"data.split must be three fractions summing to 1, got {cfg.data.split}",
    )
    need(
        cfg.lora.r >= 1 and cfg.lora.alpha > 0 and 0 <= cfg.lora.dropout < 1,
        "lora: r >= 1, alpha > 0 and 0 <= dropout < 1",
    )
    _check_bounds(cfg)
    for f in cfg.data.files:
        need(Path(f).is_file(), f"data.files: {f} not found")
    if cfg.model is not None:
        need(Path(cfg.model).is_dir(), f"model: {cfg.model} is not a folder")
        need((Path(cfg.model) / "config.json").is_file(), f"model: {cfg.model} has no config.json")
