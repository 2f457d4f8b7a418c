"""`fasttune export`: a model (and adapter) re-written as a Hugging Face folder, a PEFT adapter, a merged
folder, or one GGUF file for llama.cpp and Ollama.

    export("out/run/model", "out/q8.gguf", "gguf", quant="q8_0")
    export("Qwen2.5-0.5B-Instruct", "out/merged", "merged", adapter="out/run/adapter")
    export("out/run/adapter", "out/model.gguf", "gguf")    # an adapter folder names its base model

Formats:
    hf      the full model re-saved (`weights.save_model`), optionally cast with `dtype`
    peft    the adapter re-saved in PEFT format (`lora.save_adapter`), with the tokenizer
    merged  base + adapter folded together in fp32 (`merge.merge_to_folder`), saved as a full folder
    gguf    one .gguf file (`export/gguf.py`'s `write_gguf`); an adapter is merged first

The source. `model_dir` is a Hugging Face folder, an adapter folder (its `base_model_name_or_path` names
the base), or a `fasttune run` output folder (its `adapter/`, else its `model/`), resolved by
models/folders.py as every command resolves it. The tokenizer comes from
the adapter folder when it has one (a run saves it there), else from the base.

Outputs never overwrite: an existing output is an error unless `force=True`. Everything is written
under a temporary name beside the output and renamed into place when complete; with `force`, the old
output is moved aside only then, and deleted after the new one is in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fasttune.choices import EXPORT_FORMATS as FORMATS
from fasttune.errors import FasttuneError
from fasttune.models.folders import resolve_source
from fasttune.models.weights import parse_dtype

log = logging.getLogger("fasttune")


def _load_tokenizer(base: Path, adapter: Path | None, required: bool):
    from fasttune.models.tokenizer import load_tokenizer

    for folder in (adapter, base):
        if folder is not None and (folder / "tokenizer.json").exists():
            return load_tokenizer(folder)
    if required:
        where = f"{adapter} or {base}" if adapter else str(base)
        raise FasttuneError(f"{where}: no tokenizer.json; a GGUF file carries the tokenizer, so it is needed")
    return None


def _check_output(out: Path, sources: list[Path], force: bool, is_file: bool) -> None:
    resolved = out.resolve()
    for s in sources:
        # Replacing the source, or a folder that holds it, would delete what is being exported.
        if resolved == s.resolve() or resolved in s.resolve().parents:
            raise FasttuneError(f"{out}: the output may not be the source folder {s} or a folder holding it")
    if out.exists() or out.is_symlink():
        if not force:
            raise FasttuneError(f"{out}: already exists (use --force to replace it)")
        if is_file and out.is_dir():
            raise FasttuneError(
                f"{out}: is a folder; a GGUF export writes one file (name it, e.g. model.gguf)"
            )
        if not is_file and not out.is_dir():
            raise FasttuneError(f"{out}: exists and is not a folder")


def _load(base: Path, dtype):
    from fasttune.models.weights import load_model

    return load_model(base, dtype=dtype, kernels="torch")


def _swap_into_place(built: Path, out: Path) -> None:
    """Rename a finished folder to `out`; an existing `out` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    adapter: str | os.PathLike | None = None,
    dtype: str | None = None,
    quant: str = "bf16",
    force: bool = False,
    name: str | None = None,
) -> Path:
    """Export a model folder (and adapter) to `out` in `format` (hf, peft, merged, gguf); returns `out`.

    dtype: hf and merged only, the saved weights' dtype (default: as stored). quant: gguf only, bf16
    (default), f16, f32 or q8_0. force: replace an existing output. name: gguf's general.name (default:
    the model folder's name).
    """
    from fasttune.models.lora import load_adapter, save_adapter
    from fasttune.models.merge import load_merged, merge_to_folder
    from fasttune.models.weights import save_model

    if format not in FORMATS:
        raise FasttuneError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    base, adapter = resolve_source(model_dir, adapter)  # models/folders.py
    if dtype is not None and format not in ("hf", "merged"):
        raise FasttuneError(f"--dtype applies to the hf and merged formats (gguf: --quant), not {format}")
    if quant != "bf16" and format != "gguf":
        raise FasttuneError(f"--quant applies to the gguf format, not {format}")
    if format == "hf" and adapter is not None:
        raise FasttuneError(
            "format hf re-saves a full model; with an adapter use --format merged (folded in) or peft"
        )
    if format in ("peft", "merged") and adapter is None:
        raise FasttuneError(
            f"format {format} needs an adapter (--adapter DIR, or an adapter folder as --model)"
        )
    out = Path(out)
    sources = [base] + ([adapter] if adapter is not None else [])
    _check_output(out, sources, force, is_file=format == "gguf")

    try:
        dtype = parse_dtype(dtype, "--dtype")
    except ValueError as e:  # a name the CLI passed through unchecked: the user's to fix
        raise FasttuneError(str(e)) from None
    load_dtype = dtype
    if format == "gguf":
        from fasttune.export.gguf import QUANTS, require_gguf, write_gguf

        require_gguf()  # before loading anything
        if quant not in QUANTS:
            raise FasttuneError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
        # Merging in fp32 rounds the merged weight once, into the GGUF type, instead of twice.
        load_dtype = "float32" if adapter is not None else None
    tokenizer = _load_tokenizer(base, adapter, required=format == "gguf")

    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "gguf":
        model = load_merged(base, adapter, load_dtype) if adapter is not None else _load(base, load_dtype)
        write_gguf(model, tokenizer, out, quant=quant, name=name or (adapter or base).resolve().name)
        return out
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        built = staging / out.name
        if format == "peft":
            model = _load(base, dtype)
            load_adapter(model, adapter)
            save_adapter(model, built, base_model_path=str(base.resolve()))
            if tokenizer is not None:
                tokenizer.save(built)
        elif format == "merged":
            merge_to_folder(base, adapter, built, tokenizer=tokenizer, dtype=dtype)
        else:
            save_model(_load(base, dtype), built, tokenizer=tokenizer, dtype=dtype)
        _swap_into_place(built, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
