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
from fasttune import corpus, synth
from fasttune.attention import _flash_unavailable_reason
from fasttune.data import FORMATS, DataError, Source, write_jsonl
from fasttune.errors import FasttuneError
from fasttune.packing import TOO_LONG, TokenizeOptions

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


def _tokenizer(path: Path | None):
    if path is None:
        return fasttune.tokenizer.builtin_tokenizer()
    return fasttune.load_tokenizer(path)


def _tokenize_options(args) -> TokenizeOptions:
    return TokenizeOptions(
        max_seq_len=args.max_seq_len,
        too_long=args.too_long,
        system_prompt=args.system_prompt,
        train_on_input=args.train_on_input,
    )


def data_command(args) -> None:
    if args.data_command == "synth":
        records = synth.generate(args.n, args.seed)
        write_jsonl(args.out, records)
        print(f"wrote {len(records)} examples to {args.out}")
        return
    tok = _tokenizer(args.tokenizer)
    weights = args.weights or [1.0] * len(args.files)
    if len(weights) != len(args.files):
        raise DataError(f"--weights has {len(weights)} value(s) for {len(args.files)} file(s)")
    sources = [Source(str(f), args.format, w) for f, w in zip(args.files, weights, strict=True)]
    if args.data_command == "inspect":
        opts = _tokenize_options(args)
        opts.too_long, opts.max_seq_len = "truncate", 1 << 30  # inspect measures, it does not cut
        print(corpus.inspect(sources, tok, opts))
        return
    opts = corpus.PrepareOptions(
        ratios=tuple(args.split),
        seed=args.seed,
        stratify_key=args.stratify or None,
        skip_bad=args.skip_bad,
        budget=args.budget,
        tokenize=_tokenize_options(args),
    )
    r = corpus.prepare(sources, args.out, tok, opts)
    d, p = r["dedup"], r["packing"]
    print(
        f"read {r['examples_read']} examples from {len(r['files'])} file(s); rejected {r['rejected_lines']} "
        f"line(s); dropped {d['exact']} exact and {d['normalized']} normalised duplicates"
    )
    for name, s in r["splits"].items():
        print(
            f"  {name:5s} {s['examples']:7d} examples, {s['tokens']:9d} tokens, {s['targets']:8d} targets"
            + (f", {s['dropped']} over max_seq_len dropped" if s["dropped"] else "")
        )
    print(
        f"packing at {p['budget']} tokens per micro-batch: {p['micro_batches']} micro-batches, "
        f"{p['efficiency']:.1%} real tokens (batches of 32 padded to their longest: "
        f"{p['padded_32_efficiency']:.1%})"
    )
    print(
        f"wrote {args.out}/{{train,val,test}}.jsonl, {args.out}/tokenized/ and {args.out}/prepare.json "
        f"in {r['seconds']:.1f} s"
        + (
            f"; rejects in {args.out}/rejects.jsonl"
            if r["rejected_lines"] or any(s["dropped"] for s in r["splits"].values())
            else ""
        )
    )


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="inspect, prepare or synthesise instruction data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth_p = dsub.add_parser("synth", help="write the built-in synthetic proverb corpus as JSONL")
    synth_p.add_argument("--out", type=Path, required=True)
    synth_p.add_argument("--n", type=int, default=36079, help="number of examples (default: %(default)s)")
    synth_p.add_argument("--seed", type=int, default=0)
    for name, help_text in (
        ("inspect", "counts, lengths, duplicates and diversity of JSONL files"),
        ("prepare", "validate, dedup, split and tokenize JSONL files into --out"),
    ):
        p = dsub.add_parser(name, help=help_text)
        p.add_argument("files", nargs="+", type=Path)
        p.add_argument("--format", choices=FORMATS, help="the files' format (default: detected per file)")
        p.add_argument(
            "--weights",
            type=float,
            nargs="+",
            metavar="W",
            help="one per file: its training examples are seen W times per epoch (default 1)",
        )
        p.add_argument(
            "--tokenizer", type=Path, help="a model folder (default: the bundled Qwen2.5 tokenizer)"
        )
        p.add_argument(
            "--system-prompt",
            default="default",
            help="'default' (the template's), 'none', or the text of a system prompt",
        )
        p.add_argument("--train-on-input", action="store_true", help="train on the prompt's tokens too")
        p.add_argument("--max-seq-len", type=int, default=2048)
        p.add_argument("--too-long", choices=TOO_LONG, default="drop")
        if name == "prepare":
            p.add_argument("--out", type=Path, required=True)
            p.add_argument(
                "--split", type=float, nargs=3, default=(0.9, 0.05, 0.05), metavar=("TRAIN", "VAL", "TEST")
            )
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--stratify", default="meta_template", help="metadata key ('' for none)")
            p.add_argument(
                "--skip-bad",
                action="store_true",
                help="leave bad lines out and write them with their reasons to OUT/rejects.jsonl",
            )
            p.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune", description="Fast fine-tuning of Qwen-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fasttune decides")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the environment, or a model folder checked without loading it")
    info.add_argument("model", nargs="?", type=Path, help="a Hugging Face model folder")
    _add_data_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "info":
            info_environment() if args.model is None else info_checkpoint(args.model)
        elif args.command == "data":
            data_command(args)
    except FasttuneError as e:
        print(f"fasttune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
