"""`fasttune export`: a model (+ adapter) written as a Hugging Face folder, a PEFT adapter, a merged folder
or one GGUF file (fasttune/export/formats.py)."""

from __future__ import annotations

from pathlib import Path

from fasttune.choices import EXPORT_FORMATS, GGUF_QUANTS
from fasttune.cli.options import add_dtype


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model (+ adapter) as a Hugging Face folder, a PEFT adapter, a merged folder or GGUF",
        description="Export a model: hf (full folder), peft (adapter), merged (base + adapter folded), "
        "gguf (one file for llama.cpp / Ollama; an adapter is merged first).",
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="a Hugging Face model folder, an adapter folder (its base is read from adapter_config.json) "
        "or a `fasttune run` output folder",
    )
    p.add_argument("--adapter", type=Path, metavar="DIR", help="a PEFT LoRA adapter folder for --model")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="a folder, or a .gguf file")
    add_dtype(p, "hf/merged: the saved dtype, ", default="as stored")
    p.add_argument(
        "--quant",
        choices=GGUF_QUANTS,
        default="bf16",
        help="gguf: the weights' type; norms and biases stay F32 (default: %(default)s)",
    )
    p.add_argument("--name", help="gguf: general.name (default: the model folder's name)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def command(args) -> int:
    from fasttune.export.formats import export

    out = export(
        args.model,
        args.out,
        args.format,
        adapter=args.adapter,
        dtype=args.dtype,
        quant=args.quant,
        force=args.force,
        name=args.name,
    )
    if out.is_file():
        print(f"wrote {out} ({args.format}, {args.quant}, {out.stat().st_size / 2**20:.1f} MiB)")
    else:
        print(f"wrote {out}/ ({args.format})")
    return 0
