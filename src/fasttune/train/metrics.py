"""What a run reports: tokens/s, MFU, peak memory; metrics.jsonl every step, a progress line, TensorBoard.

MFU = achieved training FLOP/s over the GPU's dense bf16 peak. Training FLOPs per token are 6 N for the
matmul parameters N (forward 2N, backward 4N; the input embedding is a lookup, not a matmul, unless the
head shares it) plus attention, 6 x layers x n_q x hd x (mean document length): the causal QK^T and AV
products over half the document on average, times three for the backward pass. LoRA's frozen weights
need no weight gradient, so about 4 N. For Qwen2.5-0.5B this is 2.96 GFLOP per token plus 0.13 MFLOP per
token of document length.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from fasttune.models.model import CausalLM

log = logging.getLogger("fasttune")

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' datasheets.
PEAK_TFLOPS = {
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "RTX 4080": 97.5,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "T4": 65.0,
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (a CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def matmul_parameters(model: CausalLM) -> int:
    n = sum(p.numel() for p in model.parameters())
    # QLoRA's NF4 weights are buffers, not parameters: count the weights they stand for (qlora.NF4Linear)
    n += sum(getattr(m, "nf4_weight_numel", 0) for m in model.modules())
    if not model.config.tie_word_embeddings:
        n -= model.model.embed_tokens.weight.numel()
    return n


def flops_per_token(model: CausalLM, mean_doc_len: float, lora: bool = False) -> float:
    c = model.config
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * mean_doc_len
    return (4 if lora else 6) * matmul_parameters(model) + attention


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class MetricsLog:
    """metrics.jsonl (one object per optimizer step, flushed), a progress line on a terminal or plain log
    lines every `log_every` steps otherwise, and TensorBoard scalars when asked for and installed."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        log_every: int = 10,
        tensorboard: bool = False,
        resume: bool = False,
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total, self.log_every = total_steps, log_every
        self.tty = sys.stdout.isatty()
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.file = open(self.path, "a" if resume else "w", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                log.warning(
                    "tensorboard=true but the tensorboard package is not installed: "
                    "pip install tensorboard; logging to metrics.jsonl only"
                )

    def drop_after(self, step: int) -> None:
        """On resume: forget logged steps after the checkpoint's, which the run will redo."""
        self.file.close()
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")

    def step(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        step = record["step"]
        if self.first_step is None:
            self.first_step, self.start = step, time.perf_counter()
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {record['mfu']:.1%}")
        if record.get("memory_gib") is not None:
            parts.append(f"mem {record['memory_gib']:.1f} GiB")
        parts.append(f"ETA {_duration(eta)}")
        line = " | ".join(parts)
        if self.tty:
            end = "\n" if step == self.total or "val_loss" in record else ""
            print(f"\r{line:<110}", end=end, flush=True)
        elif step % self.log_every == 0 or step == self.total or "val_loss" in record:
            print(line, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
