"""The one device resolver: "auto", "cpu", "cuda", "cuda:1", ... to a `torch.device` that exists here.

Every command and the run config take the same spelling, and "auto" means the same everywhere: CUDA when a
CUDA device is available, else the CPU. A device that does not exist here is an error naming it, never a
silent move to another device.
"""

from __future__ import annotations

import torch

from fasttune.errors import ConfigError


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """`what` names the option or key in the error (e.g. "--device" or "device")."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what} {str(name)!r} is not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {str(device)!r}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"{what} {str(device)!r}: this machine has {count} CUDA device(s)")
    return device
