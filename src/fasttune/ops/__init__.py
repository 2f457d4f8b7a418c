"""Fused Triton ops. One op per file, in this order: `<op>_ref` (pure PyTorch, the reference), the Triton
kernels, their launchers, `<Op>Function` (the autograd function, its math in the docstring), and the
public `<op>()`.

Where a Triton kernel runs: on CUDA tensors, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, how the tests check kernels without a GPU). Anywhere else the public function is
not called: the model chooses per run between these ops and the references (`kernels=`), and says which.
"""

from __future__ import annotations

import os

import torch

from fasttune.choices import KERNELS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """True if Triton can run on these tensors: all on CUDA, or all on the CPU under the interpreter."""
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreting()


def check_triton(*tensors: torch.Tensor, op: str) -> None:
    if not triton_runs_on(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
            f"got tensors on {', '.join(devices)}"
        )


def choose_kernels(requested: str, device: torch.device) -> tuple[str, str]:
    """("triton" or "torch", why). "auto" takes Triton on CUDA and the PyTorch references elsewhere;
    asking for "triton" where it cannot run is an error, never a silent fallback."""
    if requested not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {requested!r}")
    if requested == "torch":
        return "torch", "requested"
    try:
        import triton  # noqa: F401
    except ImportError:
        missing = "the triton package is not installed"
        if requested == "triton":
            raise RuntimeError(f"kernels='triton': {missing}") from None
        return "torch", f"auto: {missing}"
    if device.type == "cuda":
        return "triton", "requested" if requested == "triton" else "auto: CUDA device"
    if requested == "triton":
        if device.type == "cpu" and interpreting():
            return "triton", "requested, on the CPU through Triton's interpreter (slow; for tests)"
        raise RuntimeError(
            f"kernels='triton' needs a CUDA device (the model is on {device}); "
            "use kernels='auto' or 'torch' here"
        )
    return "torch", f"auto: no CUDA device (the model is on {device}); Triton kernels run on CUDA"
