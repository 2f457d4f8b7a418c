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
        raise RuntimeError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                           f"got tensors on {', '.join(devices)}")
