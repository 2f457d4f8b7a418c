"""The `fasttune` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

import fasttune
from fasttune.attention import _flash_unavailable_reason
from fasttune.errors import FasttuneError

SAMPLE = [
    {"role": "user", "content": "Tell me something about color."},
    {"role": "assistant", "content": "A patient heart sees colors in the dark that hurried eyes miss."},
]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_environment() -> None:
    """What fasttune will run on: versions, devices, and the attention path for each."""
    print(f"fasttune {fasttune.__version__} on Python {platform.python_version()} ({platform.machine()})")
    for pkg in ("torch", "triton", "safetensors", "tokenizers", "flash-attn", "bitsandbytes"):
        print(f"  {pkg:12s} {_version(pkg)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}       {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
        devices = [(torch.device("cuda"), torch.bfloat16)]
    else:
        print("  cuda         no CUDA device: models run on the CPU")
        devices = []
    for device, dtype in devices + [(torch.device("cpu"), torch.float32)]:
        reason = _flash_unavailable_reason(device, dtype)
        path = "flash-attn varlen" if reason is None else f"SDPA per sequence (flash-attn: {reason})"
        print(f"  attention on {device.type}/{str(dtype).replace('torch.', '')}: {path}")


def info_checkpoint(folder: Path) -> None:
    """Validate a model folder without loading its weights, and show its tokenizer's chat rendering."""
    plan = fasttune.check_checkpoint(folder)
    c = plan.config
    files = sorted({f.name for f in plan.location.values()})
    size = sum(f.stat().st_size for f in {*plan.location.values()})
    print(
        f"{folder}: {c.model_type}, {plan.num_parameters / 1e6:.1f}M parameters, stored as "
        f"{'/'.join(plan.stored_dtypes)} in {len(files)} file(s), {size / 2**30:.2f} GiB; "
        "all keys and shapes check out"
    )
    print(
        f"  layers {c.num_hidden_layers}, H {c.hidden_size}, I {c.intermediate_size}, V {c.vocab_size}, "
        f"heads {c.num_attention_heads} q / {c.num_key_value_heads} kv x hd {c.head_dim}, "
        f"{'tied' if c.tie_word_embeddings else 'untied'} head, rope theta {c.rope_theta:g}"
        + (f" ({c.rope_scaling['rope_type']} scaling)" if c.rope_scaling else "")
    )
    if not (folder / "tokenizer.json").exists():
        print("  no tokenizer.json in this folder")
        return
    tok = fasttune.load_tokenizer(folder)
    print(f"  tokenizer: {tok.vocab_size} tokens; stops on {', '.join(tok.stop_tokens) or 'nothing known'}")
    if tok.vocab_size > c.vocab_size:
        print(
            f"  warning: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{c.vocab_size}: ids past it would fail in the embedding"
        )
    if tok.chat_template:
        enc = tok.encode_chat(SAMPLE)
        print(f"  a sample conversation, {len(enc.ids)} tokens, {sum(enc.mask)} trained ([[...]]):")
        print("    " + fasttune.tokenizer.format_mask(tok, enc).replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune", description="Fast fine-tuning of Qwen-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fasttune decides")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the environment, or a model folder checked without loading it")
    info.add_argument("model", nargs="?", type=Path, help="a Hugging Face model folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "info":
            info_environment() if args.model is None else info_checkpoint(args.model)
    except FasttuneError as e:
        print(f"fasttune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
