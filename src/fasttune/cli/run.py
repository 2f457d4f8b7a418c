"""`fasttune run`: train (the built-in tiny run with no config, else a YAML recipe with key=value
overrides), on N processes with --nproc, or plan it with --dry-run."""

from __future__ import annotations

import os


def add_subparser(sub) -> None:
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
    run.add_argument(
        "--gpu", help="with --dry-run: plan for this GPU, e.g. rtx4090 or h100 (an unknown name lists them)"
    )
    run.add_argument("--shape", help="with --dry-run: plan a named shape (e.g. qwen2.5-7b) without weights")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="tokenize a few examples, count parameters, estimate memory, and exit",
    )


def command(args) -> int:
    from fasttune.errors import FasttuneError
    from fasttune.train import config as config_mod

    if args.config is not None and "=" in str(args.config):  # `fasttune run key=value ...` with no file
        args.overrides.insert(0, str(args.config))
        args.config = None
    if (args.gpu or args.shape) and not args.dry_run:
        raise FasttuneError("--gpu and --shape choose what --dry-run plans; a run uses its own GPU and model")
    if args.shape:  # plan a named shape: the config's model folder is neither read nor needed
        args.overrides.append("~model")
    cfg = config_mod.load_config(args.config, args.overrides)  # checked here, before any launch
    if args.nproc > 1 and not (args.print_config or args.dry_run):
        _launch(args, cfg)  # does not return
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        from fasttune.plan.dry_run import dry_run

        print(dry_run(cfg, nproc=args.nproc, gpu=args.gpu, shape=args.shape))
        return 0
    return _train(args, cfg)


def _launch(args, cfg) -> None:
    from fasttune.train import distributed

    if not args.resume:  # refused here, before N processes start (a resume checks its checkpoint's)
        distributed.split_global_batch(
            cfg.tokens_per_step, cfg.micro_batch_tokens, cfg.data.max_seq_len, args.nproc
        )
    distributed.launch(args.nproc, _without_nproc(args.argv))


def _train(args, cfg) -> int:
    from fasttune.train import loop as train

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
