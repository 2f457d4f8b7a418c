"""The one LoRA merge path: base weights read fresh from the base folder, W + s B A in fp32, rounded once to
the dtype the merged folder declares. `fasttune export --format merged`, a run's `lora.merge=true` (LoRA and
QLoRA) and the GGUF export of an adapter all go through `load_merged`.

Why fresh from the folder: a LoRA run trains against a bf16 copy of the base (precision=bf16), and a QLoRA
run against NF4 weights. Merging into that copy rounds the base to bf16 before adding the update, so a
merged folder declared float32 differed from base + adapter by ~3e-2 in logits; merging into the stored
weights makes it the fp32 sum (~1e-6).

Host memory: the base in the dtype it is merged in (the target dtype when every stored tensor already has
it, else fp32: reading bf16 into fp32 is exact, so the sum is rounded once either way), plus one layer's
fp32 merged weight at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fasttune.models.lora import load_adapter, merge_lora
from fasttune.models.model import CausalLM
from fasttune.models.weights import _ST_DTYPES, check_checkpoint, load_model, parse_dtype, save_model


def declared_dtype(base: str | os.PathLike) -> torch.dtype:
    """The dtype a model folder's config.json declares (float32 when it declares none)."""
    hf = check_checkpoint(base).config.hf
    return parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32", f"{base}/config.json: dtype")


def _merge_dtype(base: str | os.PathLike, target: torch.dtype) -> torch.dtype:
    stored = {_ST_DTYPES.get(d) for d in check_checkpoint(base).stored_dtypes}
    return target if stored == {target} else torch.float32


def load_merged(
    base: str | os.PathLike, adapter: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> CausalLM:
    """`base` + the LoRA adapter folder `adapter`, merged (W + s B A in fp32), on the CPU in `dtype`
    (default: the dtype the base folder declares)."""
    target = parse_dtype(dtype) or declared_dtype(base)
    model = load_model(base, dtype=_merge_dtype(base, target), device="cpu", kernels="torch")
    load_adapter(model, adapter)
    merge_lora(model)  # fp32 sum per layer, cast to the dtype read (the target, or fp32)
    return model.to(target)  # parameter by parameter: one layer's copy at a time


def merge_to_folder(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write base + adapter merged as a Hugging Face folder `out`, in `dtype` (default: the base's declared
    dtype); config.json declares the dtype the tensors have."""
    model = load_merged(base, adapter, dtype)
    return save_model(model, Path(out), tokenizer=tokenizer, dtype=next(model.parameters()).dtype)
