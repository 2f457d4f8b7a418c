"""LoRA adapters for `CausalLM`, in plain PyTorch, saved and loaded in PEFT's format.

The math. A frozen linear layer y = x W^T + b (W [out, in]) gets a trainable low-rank update:

    y = x W^T + b + s * dropout(x) A^T B^T,     A [r, in], B [out, r], s = alpha / r

A starts kaiming-uniform (a = sqrt(5)) and B at zero, as in PEFT, so a fresh adapter adds exactly 0.0 and
the model's logits do not change by a single bit. Dropout acts on the adapter's input only, and only in
training mode. Merging folds the update into the weight: W' = W + s * B A.

The memory choice. The base weights stay frozen in their own dtype (bf16, typically): they get no
gradient and no optimizer state. A and B are kept in fp32 whatever the base dtype, because they are the
only weights that train: bf16's 8-bit mantissa would round away the small Adam updates, and at
r * (in + out) values per layer the fp32 copies cost about 1% of a bf16 model. The adapter path runs in
fp32 from x and is cast to the base output's dtype only when added. The price is activation memory:
autograd keeps each adapted layer's fp32 input (dropped out, when dropout is on) for A's gradient, so
q/k/v and gate/up each hold their own fp32 copy of the same hidden states. The fused Triton version
(another file) avoids that by saving x once in its own dtype.

On disk an adapter is a PEFT folder: `adapter_config.json` and `adapter_model.safetensors` keyed
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, so `peft.PeftModel.from_pretrained` loads
what `save_adapter` writes, and `load_adapter` loads plain LoRA adapters that PEFT wrote.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fasttune.errors import CheckpointError, ConfigError
from fasttune.models.weights import _ST_DTYPES, _move_into, _names, read_json, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel wrapping the transformers model
_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT options that change what an adapter computes and that fasttune does not implement: each must be
# off (false, null, empty) in a loaded adapter_config.json. Init-only options (init_lora_weights, loftq...)
# do not matter once the weights are trained and are ignored.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
)


@dataclass
class LoraConfig:
    """Rank, scale (s = alpha / r), dropout on the adapter input, and the linear layers to adapt, named by
    their attribute name inside each decoder layer."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = _DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        # A bare string would iterate as characters: "q_proj" -> targets "q", "_", ...
        if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"LoRA targets must be a list of module names, got {self.targets!r}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ConfigError(f"LoRA targets must name at least one module, e.g. {list(_DEFAULT_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) plus fp32 adapters `lora_A` [r, in] and `lora_B` [out, r]."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = r, alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kernels = "torch"  # set by CausalLM.set_kernels
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A kaiming-uniform, B zero, so that the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":  # the LoRA up-projection fused into the base GEMM (ops/lora_linear.py)
            from fasttune.ops.lora_linear import lora_linear

            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return lora_linear(
                x,
                self.base_layer.weight,
                self.base_layer.bias,
                self.lora_A.weight,
                self.lora_B.weight,
                self.scaling,
                dropout_p=p,
                training=self.training,
            )
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.float()))) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A in fp32 (not attached to the autograd graph)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return self.base_layer.weight.float() + self.scaling * delta

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _find_targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """{module name: linear} for the target linears inside `model.model.layers`; nothing is changed."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"apply_lora: {type(model).__name__} has no decoder layers at model.model.layers")
    found: dict[str, nn.Linear] = {}
    linear_names: set[str] = set()
    for name, module in layers.named_modules(prefix="model.layers"):
        if isinstance(module, LoraLinear):
            raise ConfigError(f"apply_lora: {name} already has a LoRA adapter (merge_lora it first)")
        if isinstance(module, nn.Linear):
            short = name.rpartition(".")[2]
            linear_names.add(short)
            if short in targets:
                found[name] = module
    unknown = [t for t in targets if t not in linear_names]
    if unknown:
        raise ConfigError(
            f"LoRA target(s) {', '.join(map(repr, unknown))} match no linear layer in model.layers; "
            f"the linear layers there are: {', '.join(sorted(linear_names))}"
        )
    return found


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None) -> list[str]:
    """Wrap each target linear of the decoder layers in a `LoraLinear` (never the head or embeddings),
    freeze every other parameter, and return the sorted names of the adapted modules. Targets are checked
    before anything changes, so an error leaves the model as it was."""
    cfg = cfg or LoraConfig()
    found = _find_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found.items():
        parent_name, _, attr = name.rpartition(".")
        adapter = LoraLinear(linear, cfg.r, cfg.alpha, cfg.dropout)
        adapter.train(model.training)  # a new module starts in training mode; it must follow the model's
        adapter.kernels = model.info.kernels  # and the model's choice of ops
        setattr(model.get_submodule(parent_name), attr, adapter)
    model.info.lora_config = cfg
    model.info.lora_targets = sorted(found)
    return list(model.info.lora_targets)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (A and B of every adapted module), for the optimizer."""
    params = [p for _, m in _lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]
    return [p for p in params if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied head counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed as PEFT saves them, as fp32 CPU copies."""
    state = {}
    for name, m in _lora_modules(model):
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight.detach()
            state[f"{_PREFIX}{name}.{part}.weight"] = w.to(device="cpu", dtype=torch.float32, copy=True)
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_path: str | None = None) -> Path:
    """Write the adapter as a PEFT folder. `base_model_path` defaults to the folder the model was loaded
    from. Files are written to a temporary folder beside `path` and then renamed into place."""
    cfg = model.info.lora_config
    modules = _lora_modules(model)
    if cfg is None or not modules:
        raise ConfigError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    # Only keys that PEFT has had since 0.13 (the oldest version fasttune supports), so that no version
    # warns about unknown keys; PEFT fills in every other field with its default, which means "off".
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path or model.info.source_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted({name.rpartition(".")[2] for name, _ in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    state = lora_state_dict(model)
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
        _move_into(tmp, folder, keep={ADAPTER_WEIGHTS, ADAPTER_CONFIG})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _config_from_peft(d: dict, source: Path) -> LoraConfig:
    """The `LoraConfig` of a PEFT adapter_config.json, refusing what fasttune would compute differently."""
    if d.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{source}: peft_type is {d.get('peft_type')!r}; fasttune loads only LORA adapters"
        )
    problems = [f"{k}={d[k]!r}" for k in _UNSUPPORTED if d.get(k)]
    if d.get("bias", "none") != "none":
        problems.append(f"bias={d['bias']!r}")
    if problems:
        raise CheckpointError(
            f"{source}: unsupported LoRA feature(s) {', '.join(problems)}; fasttune loads plain LoRA "
            "adapters (no DoRA, rsLoRA, bias, per-module ranks, layer selection or modules_to_save)"
        )
    targets = d.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise CheckpointError(
            f"{source}: target_modules={targets!r}; fasttune needs a list of module names (not a regex)"
        )
    try:
        # PEFT's defaults for the fields it may omit.
        return LoraConfig(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            targets=tuple(sorted(targets)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Apply and load a PEFT LoRA folder into `model`; returns the adapted module names. Everything (config,
    safetensors header, key set and shapes) is checked before the model changes. A model that already has
    adapters (resuming, say) gets the weights loaded into them if rank, alpha and targets agree."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (an adapter folder holds {ADAPTER_CONFIG})")
    cfg = _config_from_peft(read_json(folder / ADAPTER_CONFIG), folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(pickled)}: pickle-based weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{weights}: file not found{hint}")

    existing = dict(_lora_modules(model))
    if existing:
        have = model.info.lora_config
        same = have is not None and (have.r, have.alpha) == (cfg.r, cfg.alpha)
        wanted = {n.rpartition(".")[2] for n in existing}
        if not same or wanted != set(cfg.targets):
            raise CheckpointError(
                f"{folder}: the model already has LoRA adapters (r={getattr(have, 'r', None)}, targets "
                f"{sorted(wanted)}) that differ from this adapter's (r={cfg.r}, alpha={cfg.alpha}, targets "
                f"{list(cfg.targets)}); load it into a model without adapters"
            )
        shapes = {n: (m.in_features, m.out_features) for n, m in existing.items()}
    else:
        try:
            found = _find_targets(model, cfg.targets)
        except ConfigError as e:
            raise CheckpointError(f"{folder / ADAPTER_CONFIG}: {e}") from None
        shapes = {n: (m.in_features, m.out_features) for n, m in found.items()}
    expected = {}
    for name, (n_in, n_out) in shapes.items():
        expected[f"{_PREFIX}{name}.lora_A.weight"] = (cfg.r, n_in)
        expected[f"{_PREFIX}{name}.lora_B.weight"] = (n_out, cfg.r)

    header, _ = read_safetensors_header(weights)
    problems = []
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    for key in sorted(set(expected) & set(header)):
        shape, dtype = tuple(header[key]["shape"]), header[key]["dtype"]
        if shape != expected[key]:
            problems.append(f"wrong shape for {key}: {shape}, r={cfg.r} and the model imply {expected[key]}")
        elif not _ST_DTYPES[dtype].is_floating_point:
            problems.append(f"{key} is {dtype}, not a floating-point tensor")
    if problems:
        raise CheckpointError(
            f"{weights}: adapter does not match {ADAPTER_CONFIG} and the model: " + "; ".join(problems)
        )

    if not existing:
        apply_lora(model, cfg)  # else the model's adapters, and their dropout, stay as they are
    tensors = load_file(str(weights))  # safetensors: no unpickling
    with torch.no_grad():
        for name, m in _lora_modules(model):
            m.lora_A.weight.copy_(tensors[f"{_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{_PREFIX}{name}.lora_B.weight"])
    return list(model.info.lora_targets)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + s B A in fp32, then cast to the base dtype) and put the
    base `nn.Linear` back in its place, in place. Parameters keep their requires_grad (frozen)."""
    for name, m in _lora_modules(model):
        base = m.base_layer
        merged = m.merged_weight().to(base.weight.dtype)
        base.weight = nn.Parameter(merged, requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, base)
    model.info.lora_config = None
    model.info.lora_targets = None
    return model
