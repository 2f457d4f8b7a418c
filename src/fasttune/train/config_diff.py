"""What changed between a run's saved config and the config it is resumed with, sorted by consequence.

- trajectory: keys that change what the model learns from here on (the model, the data and how it is
  tokenized, the batch, the optimizer and its schedule, the seed, the method and its adapters, the
  precision). A resume with one of these changed is no longer the run it claims to continue.
- extension: a larger `max_steps` (or `epochs` when `max_steps` is unset): the run goes on for longer. The
  schedule is stretched to the new length from the resumed step on, which is what "train for longer"
  means; a shorter run, or a switch between steps and epochs, is a trajectory change.
- other: everything else (evaluation and checkpoint intervals, logging, output place, device, kernels,
  parallel strategy, what is exported): listed, allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fasttune.train.config import RunConfig

# Exact keys and whole sections (a trailing dot) that change the trajectory.
TRAJECTORY = (
    "model",
    "method",
    "seed",
    "precision",
    "micro_batch_tokens",
    "tokens_per_step",
    "data.",
    "optim.",
    "lora.",
)
NOT_TRAJECTORY = ("lora.merge",)  # what is exported at the end, not what is trained

Change = tuple[str, Any, Any]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_trajectory(key: str, adapters: bool) -> bool:
    if key in NOT_TRAJECTORY or (key.startswith("lora.") and not adapters):
        return False
    return any(key == t or (t.endswith(".") and key.startswith(t)) for t in TRAJECTORY)


@dataclass
class ConfigChanges:
    trajectory: list[Change] = field(default_factory=list)
    extension: list[Change] = field(default_factory=list)
    other: list[Change] = field(default_factory=list)

    @staticmethod
    def describe(changes: list[Change]) -> str:
        return "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)

    def report_lines(self, allowed: bool) -> list[str]:
        lines = []
        if self.extension:
            lines.append(f"resume: extending the run: {self.describe(self.extension)}")
        if self.trajectory and allowed:
            lines.append(
                f"resume: --allow-config-change: continuing with {self.describe(self.trajectory)} "
                "(the trajectory differs from the saved run's from here on)"
            )
        if self.other:
            lines.append(f"resume: other config changes: {self.describe(self.other)}")
        return lines


def _length_change(old: dict, new: dict) -> tuple[list[Change], list[Change], list[Change]]:
    """max_steps and epochs: (trajectory, extension, other)."""
    changed = [(k, old.get(k), new.get(k)) for k in ("max_steps", "epochs") if old.get(k) != new.get(k)]
    if not changed:
        return [], [], []
    o_steps, n_steps = old.get("max_steps"), new.get("max_steps")
    if o_steps is not None and n_steps is not None:  # epochs are ignored while max_steps is set
        epochs = [c for c in changed if c[0] == "epochs"]
        steps = [c for c in changed if c[0] == "max_steps"]
        longer = bool(steps) and n_steps > o_steps
        return ([] if longer else steps), (steps if longer else []), epochs
    if o_steps is None and n_steps is None and new.get("epochs") > old.get("epochs"):
        return [], changed, []
    return changed, [], []


def compare_configs(saved: dict, new: dict) -> ConfigChanges:
    """`saved`: the run's config.yaml as read (keys it lacks take today's defaults, so a config written by
    an older fasttune compares as it would have resolved); `new`: RunConfig.to_dict() of this resume."""
    defaults = flatten(RunConfig().to_dict())
    old, cur = {**defaults, **flatten(saved)}, flatten(new)
    trajectory, extension, other = _length_change(old, cur)
    adapters = old.get("method") != "full" or cur.get("method") != "full"  # else lora.* is never used
    for key in sorted(set(old) | set(cur)):
        if key in ("max_steps", "epochs") or old.get(key) == cur.get(key):
            continue
        (trajectory if _is_trajectory(key, adapters) else other).append((key, old.get(key), cur.get(key)))
    return ConfigChanges(trajectory, extension, other)


def reapply_hyperparameters(cfg: RunConfig, optimizer, scheduler) -> None:
    """After a resume with changed (allowed) or extended settings: the checkpoint restored the saved lr,
    weight decay, betas and eps into the optimizer; the run goes on with the new config's, at the lr the
    new schedule gives at the resumed step (LambdaLR's lr = base lr x factor(step), the factor built from
    the new config by train/setup.py's build_optimizer)."""
    scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True)):
        group.update(initial_lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        group["weight_decay"] = cfg.optim.weight_decay if i == 0 else 0.0  # build_optimizer's two groups
        group["lr"] = cfg.optim.lr * factor(scheduler.last_epoch)
