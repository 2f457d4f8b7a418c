"""The `fasttune` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

import fasttune
from fasttune.data import corpus, synth
from fasttune.data.packing import TOO_LONG, TokenizeOptions
from fasttune.data.records import FORMATS, DataError, Source, read_sources, write_jsonl
from fasttune.errors import FasttuneError
from fasttune.models.attention import _flash_unavailable_reason

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
        print("    " + fasttune.models.tokenizer.format_mask(tok, enc).replace("\n", "\n    "))


def _tokenizer(path: Path | None):
    if path is None:
        return fasttune.models.tokenizer.builtin_tokenizer()
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
        print(corpus.inspect(sources, tok, opts, max_seq_len=args.max_seq_len))
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


def run_command(args) -> int:
    from fasttune.train import config as config_mod
    from fasttune.train import loop as train

    if args.config is not None and "=" in str(args.config):  # `fasttune run key=value ...` with no file
        args.overrides.insert(0, str(args.config))
        args.config = None
    if (args.gpu or args.shape) and not args.dry_run:
        raise FasttuneError("--gpu and --shape choose what --dry-run plans; a run uses its own GPU and model")
    if args.shape:  # plan a named shape: the config's model folder is neither read nor needed
        args.overrides.append("~model")
    cfg = config_mod.load_config(args.config, args.overrides)  # checked here, before any launch
    if args.nproc > 1 and not (args.print_config or args.dry_run):
        from fasttune.train import distributed

        if not args.resume:  # refused here, before N processes start (a resume checks its checkpoint's)
            distributed.split_global_batch(
                cfg.tokens_per_step, cfg.micro_batch_tokens, cfg.data.max_seq_len, args.nproc
            )
        distributed.launch(args.nproc, _without_nproc(args.argv))  # does not return
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        dry_run(cfg, nproc=args.nproc, gpu=args.gpu, shape=args.shape)
        return 0
    result = train.run(
        cfg, resume=args.resume, force=args.force, allow_config_change=args.allow_config_change
    )
    if result.stopped == "signal":
        return 0
    if result.val_loss is not None and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {result.step} steps, validation loss {result.val_loss:.4f}; "
            f"outputs in {result.output_dir}"
        )
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for each launched process: the same, minus --nproc (and its value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def dry_run(cfg, nproc: int = 1, gpu: str | None = None, shape: str | None = None) -> None:
    """The model on the meta device, a few tokenized examples, parameter counts and the plan (memory per
    GPU, time per epoch: fasttune/plan.py) for `gpu` (default: the one here, else an RTX 4090). `shape`:
    a named shape (qwen2.5-7b, ...) planned without weights, rendered with the bundled Qwen2.5 tokenizer."""
    from fasttune.data.packing import TokenizeOptions, tokenize, with_system_prompt
    from fasttune.data.records import Example
    from fasttune.models import builtin
    from fasttune.models.model import CausalLM, ModelConfig
    from fasttune.models.tokenizer import format_mask
    from fasttune.models.weights import read_config

    records = synth.generate(64, cfg.seed) if not cfg.data.files else None
    if records is not None:
        examples = [
            Example([{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}])
            for r in records
        ]
    else:
        examples, _ = read_sources([Source(cfg.data.files[0], cfg.data.format)])
        examples = examples[:64]
    if shape is not None:
        from fasttune.plan.estimate import resolve_model

        tok, (mcfg, _) = fasttune.models.tokenizer.builtin_tokenizer(), resolve_model(shape)
    elif cfg.model is not None:
        tok, mcfg = fasttune.load_tokenizer(cfg.model), read_config(cfg.model)
    else:
        tok = builtin.train_tokenizer([m["content"] for e in examples for m in e.messages], vocab_size=512)
        mcfg = ModelConfig.from_hf(builtin.tiny_config(tok), "built-in tiny Qwen2")
    opts = TokenizeOptions(cfg.data.max_seq_len, "truncate", cfg.data.system_prompt, cfg.data.train_on_input)
    data, _ = tokenize(examples, tok, opts)
    enc = tok.encode_chat(with_system_prompt(examples[0].messages, cfg.data.system_prompt, tok))
    print(f"example ({len(enc.ids)} tokens, trained tokens in [[...]]):")
    print("  " + format_mask(tok, enc).replace("\n", "\n  "))
    print(
        f"tokens per example over {len(data)} examples: mean {data.lengths.mean():.1f}, "
        f"max {data.lengths.max()}"
    )
    with torch.device("meta"):
        model = CausalLM(mcfg)
    total = model.num_parameters()
    trainable = total
    if cfg.method in ("lora", "qlora"):
        from fasttune.models.lora import LoraConfig, apply_lora, count_parameters

        apply_lora(model, LoraConfig(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets)))
        trainable, total = count_parameters(model)
    print(
        f"model: {mcfg.model_type}, {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({cfg.method})"
    )
    from fasttune.plan.estimate import plan_for_run

    n = cfg.data.synth_n  # examples per epoch: the built-in corpus, or every file's count x its weight
    if cfg.data.files:
        weights = cfg.data.weights or [1.0] * len(cfg.data.files)
        counts = [len(read_sources([Source(f, cfg.data.format)])[0]) for f in cfg.data.files]
        n = sum(c * w for c, w in zip(counts, weights, strict=True))
    name = shape or (Path(cfg.model).name if cfg.model else "built-in tiny Qwen2")
    print(plan_for_run(cfg, mcfg, name, nproc, gpu, float(data.lengths.mean()), round(n)))


def bench_command(args: list[str]) -> int:
    """`fasttune bench`: the benchmark's own parser and runner (fasttune.bench.cli)."""
    from fasttune.bench.cli import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every argument goes to the benchmark's own parser
        try:
            return bench_command(argv[1:])
        except FasttuneError as e:
            print(f"fasttune: error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="fasttune", description="Fast fine-tuning of Qwen-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fasttune decides")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="the environment, or a model folder checked without loading it")
    info.add_argument("model", nargs="?", type=Path, help="a Hugging Face model folder")
    _add_data_parser(sub)
    run = sub.add_parser("run", help="train: the built-in default with no config, else a YAML recipe")
    run.add_argument("config", nargs="?", help="a YAML config (default: the built-in tiny run)")
    run.add_argument("overrides", nargs="*", help="key=value or ~key (reset to the default)")
    run.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    run.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even where model, data, batch, optimizer, schedule, seed, method, "
        "LoRA or precision differ from the run's config.yaml",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty folder that is not a fasttune run, or start a run's folder over "
        "(its previous outputs are removed)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="processes (GPUs) on this machine: N > 1 launches torchrun (default: %(default)s)",
    )
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--gpu", help="with --dry-run: plan for this GPU (fasttune plan --help lists them)")
    run.add_argument("--shape", help="with --dry-run: plan a named shape (e.g. qwen2.5-7b) without weights")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="tokenize a few examples, count parameters, estimate memory, and exit",
    )
    from fasttune.profiling import profile

    profile.add_subparser(sub)  # `fasttune profile`: its arguments and handler live in fasttune/profile.py
    from fasttune.cli import generate as generate_cli

    generate_cli.add_subparser(sub)  # `fasttune generate`: fasttune/generate_cli.py
    from fasttune.cli import eval as eval_cli

    eval_cli.add_subparser(sub)  # `fasttune eval`: fasttune/eval_cli.py
    from fasttune.export import formats as export

    export.add_subparser(sub)  # `fasttune export`: fasttune/export.py
    from fasttune.plan import estimate as plan

    plan.add_subparser(sub)  # `fasttune plan`: fasttune/plan.py
    bench = sub.add_parser(
        "bench", add_help=False, help="fasttune against the Hugging Face baseline (see fasttune bench --help)"
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    # `run`'s key=value overrides may come after options (`run cfg.yaml --nproc 4 lr=1e-4`), which argparse
    # cannot assign to a positional once an option has interrupted it: collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "run" or not all("=" in a or a.startswith("~") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides.extend(extra)
    args.argv = argv
    verbose = args.verbose or args.command == "run"  # a run says what it chose (backends, kernels, AdamW)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 speaks for all; the rest only warn
        verbose = False
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "info":
            info_environment() if args.model is None else info_checkpoint(args.model)
        elif args.command == "data":
            data_command(args)
        elif args.command == "run":
            return run_command(args)
        elif args.command == "profile":
            return profile.command(args)
        elif args.command == "generate":
            return generate_cli.command(args)
        elif args.command == "eval":
            return eval_cli.command(args)
        elif args.command == "export":
            return export.command(args)
        elif args.command == "plan":
            return plan.command(args)
    except FasttuneError as e:
        print(f"fasttune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user named: missing, unreadable, a full disk (str(e) names the file)
        if args.verbose:
            raise
        print(f"fasttune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not the user's doing: one line, and the traceback behind -v
        if args.verbose:
            raise
        print(
            f"fasttune: internal error: {type(e).__name__}: {e} (run `fasttune -v {args.command} ...` for "
            "the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
