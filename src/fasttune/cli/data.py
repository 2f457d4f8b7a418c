"""`fasttune data`: synthesise, inspect or prepare (validate, dedup, split, tokenize) instruction data."""

from __future__ import annotations

from pathlib import Path

from fasttune.choices import DATA_FORMATS, TOO_LONG
from fasttune.cli.options import add_seed, add_system_prompt


def add_subparser(sub) -> None:
    data = sub.add_parser("data", help="inspect, prepare or synthesise instruction data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth_p = dsub.add_parser("synth", help="write the built-in synthetic proverb corpus as JSONL")
    synth_p.add_argument("--out", type=Path, required=True)
    synth_p.add_argument("--n", type=int, default=36079, help="number of examples (default: %(default)s)")
    add_seed(synth_p, "the corpus")
    for name, help_text in (
        ("inspect", "counts, lengths, duplicates and diversity of JSONL files"),
        ("prepare", "validate, dedup, split and tokenize JSONL files into --out"),
    ):
        p = dsub.add_parser(name, help=help_text)
        p.add_argument("files", nargs="+", type=Path)
        p.add_argument(
            "--format", choices=DATA_FORMATS, help="the files' format (default: detected per file)"
        )
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
        add_system_prompt(p)
        p.add_argument("--train-on-input", action="store_true", help="train on the prompt's tokens too")
        p.add_argument("--max-seq-len", type=int, default=2048)
        p.add_argument("--too-long", choices=TOO_LONG, default="drop")
        if name == "prepare":
            _add_prepare_options(p)


def _add_prepare_options(p) -> None:
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--split", type=float, nargs=3, default=(0.9, 0.05, 0.05), metavar=("TRAIN", "VAL", "TEST")
    )
    add_seed(p, "the split")
    p.add_argument("--stratify", default="meta_template", help="metadata key ('' for none)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad lines out and write them with their reasons to OUT/rejects.jsonl",
    )
    p.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")


def command(args) -> int:
    from fasttune.data.records import DataError, Source

    if args.data_command == "synth":
        return _synth(args)
    weights = args.weights or [1.0] * len(args.files)
    if len(weights) != len(args.files):
        raise DataError(f"--weights has {len(weights)} value(s) for {len(args.files)} file(s)")
    sources = [Source(str(f), args.format, w) for f, w in zip(args.files, weights, strict=True)]
    if args.data_command == "inspect":
        return _inspect(args, sources)
    return _prepare(args, sources)


def _synth(args) -> int:
    from fasttune.data import synth
    from fasttune.data.records import write_jsonl

    records = synth.generate(args.n, args.seed)
    write_jsonl(args.out, records)
    print(f"wrote {len(records)} examples to {args.out}")
    return 0


def _tokenizer(path: Path | None):
    from fasttune.models.tokenizer import builtin_tokenizer, load_tokenizer

    return builtin_tokenizer() if path is None else load_tokenizer(path)


def _tokenize_options(args):
    from fasttune.data.packing import TokenizeOptions

    return TokenizeOptions(
        max_seq_len=args.max_seq_len,
        too_long=args.too_long,
        system_prompt=args.system_prompt,
        train_on_input=args.train_on_input,
    )


def _inspect(args, sources) -> int:
    from fasttune.data import corpus

    tok = _tokenizer(args.tokenizer)
    opts = _tokenize_options(args)
    opts.too_long, opts.max_seq_len = "truncate", 1 << 30  # inspect measures, it does not cut
    print(corpus.inspect(sources, tok, opts, max_seq_len=args.max_seq_len))
    return 0


def _prepare(args, sources) -> int:
    from fasttune.data import corpus

    tok = _tokenizer(args.tokenizer)
    opts = corpus.PrepareOptions(
        ratios=tuple(args.split),
        seed=args.seed,
        stratify_key=args.stratify or None,
        skip_bad=args.skip_bad,
        budget=args.budget,
        tokenize=_tokenize_options(args),
    )
    _print_prepared(corpus.prepare(sources, args.out, tok, opts), args.out)
    return 0


def _print_prepared(r: dict, out: Path) -> None:
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
    rejects = r["rejected_lines"] or any(s["dropped"] for s in r["splits"].values())
    print(
        f"wrote {out}/{{train,val,test}}.jsonl, {out}/tokenized/ and {out}/prepare.json "
        f"in {r['seconds']:.1f} s" + (f"; rejects in {out}/rejects.jsonl" if rejects else "")
    )
