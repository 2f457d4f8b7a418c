"""The one resolver of the folder a command is pointed at: a model folder, a LoRA adapter folder, or a
`fasttune run` output folder. `fasttune generate`, `fasttune eval` and `fasttune export` all resolve
through `resolve_source`, so they agree on what a folder holds and where an adapter's base is.

- A model folder has `config.json` (a full, merged or exported model).
- An adapter folder has `adapter_config.json`; its `base_model_name_or_path` names the base folder: as
  given when that is a folder (absolute, or relative to the working directory), else relative to the
  adapter folder (so a run folder moved as a whole keeps working). A hub name is not a local folder, and
  fasttune loads local folders only.
- A run folder has `adapter/` (a LoRA or QLoRA run) or `model/` (a full fine-tune); the adapter is taken
  when both exist, since a LoRA run's `model/` does not exist and a full run has no adapter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from fasttune.errors import CheckpointError, ConfigError
from fasttune.models.lora import ADAPTER_CONFIG
from fasttune.models.weights import read_json

SEPARATELY = "give the base model folder and the adapter separately (--model BASE --adapter ADAPTER)"


class Source(NamedTuple):
    base: Path  # the base (or only) model folder
    adapter: Path | None  # a PEFT adapter folder to apply on it, or None


def run_output(folder: Path) -> Path | None:
    """A run folder's trained output (its adapter/ or model/), or None when `folder` is not a run's."""
    for name in ("adapter", "model"):
        sub = folder / name
        if (sub / ADAPTER_CONFIG).is_file() or (sub / "config.json").is_file():
            return sub
    return None


def adapter_base(adapter: Path) -> Path:
    """The base model folder that an adapter folder's `base_model_name_or_path` names."""
    config_file = adapter / ADAPTER_CONFIG
    name = read_json(config_file).get("base_model_name_or_path")
    if not name or not isinstance(name, str):
        raise ConfigError(f"{config_file}: no base_model_name_or_path; {SEPARATELY}")
    for candidate in (Path(name), adapter / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"{config_file}: base_model_name_or_path={name!r} is not a local folder (fasttune loads local "
        f"folders only); {SEPARATELY}"
    )


def resolve_source(path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> Source:
    """The base folder and the adapter (or None) from a model, adapter or run folder, and an optional
    adapter folder given beside a base."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a model folder, an adapter folder or a run folder)")
    if not (folder / "config.json").exists() and not (folder / ADAPTER_CONFIG).exists():
        folder = run_output(folder) or folder
    adapter_dir = None if adapter is None else Path(adapter)
    if (folder / ADAPTER_CONFIG).exists():
        if adapter_dir is not None:
            raise ConfigError(
                f"{folder} is an adapter folder ({ADAPTER_CONFIG}) and an adapter ({adapter_dir}) was also "
                "given: pass the base model folder as the model"
            )
        return Source(adapter_base(folder), folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder}: no config.json or {ADAPTER_CONFIG} (nor model/ or adapter/ from a run)"
        )
    if adapter_dir is not None and not (adapter_dir / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    return Source(folder, adapter_dir)
