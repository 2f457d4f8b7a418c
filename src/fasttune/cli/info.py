"""`fasttune info`: the environment (versions, devices, the attention path of each), or a model folder
checked without loading its weights."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

SAMPLE = [
    {"role": "user", "content": "Tell me something about color."},
    {"role": "assistant", "content": "A patient heart sees colors in the dark that hurried eyes miss."},
]


def add_subparser(sub) -> None:
    p = sub.add_parser("info", help="the environment, or a model folder checked without loading it")
    p.add_argument("model", nargs="?", type=Path, help="a Hugging Face model folder")


def command(args) -> int:
    info_environment() if args.model is None else info_checkpoint(args.model)
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_environment() -> None:
    """What fasttune will run on: versions, devices, and the attention path for each."""
    import torch

    from fasttune.models.attention import _flash_unavailable_reason
    from fasttune.version import __version__

    print(f"fasttune {__version__} on Python {platform.python_version()} ({platform.machine()})")
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
    from fasttune.models.tokenizer import format_mask, load_tokenizer
    from fasttune.models.weights import check_checkpoint

    plan = check_checkpoint(folder)
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
    tok = load_tokenizer(folder)
    print(f"  tokenizer: {tok.vocab_size} tokens; stops on {', '.join(tok.stop_tokens) or 'nothing known'}")
    if tok.vocab_size > c.vocab_size:
        print(
            f"  warning: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{c.vocab_size}: ids past it would fail in the embedding"
        )
    if tok.chat_template:
        enc = tok.encode_chat(SAMPLE)
        print(f"  a sample conversation, {len(enc.ids)} tokens, {sum(enc.mask)} trained ([[...]]):")
        print("    " + format_mask(tok, enc).replace("\n", "\n    "))
