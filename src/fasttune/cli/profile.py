"""`fasttune profile [config.yaml] [key=value ...]`: training steps under torch.profiler; `fasttune profile
--op NAME`: one op, Triton against its PyTorch reference, across shapes (fasttune/profiling/profile.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from fasttune.choices import OPS
from fasttune.cli.options import add_device, add_dtype, device_or_none
from fasttune.errors import FasttuneError


def add_subparser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="training steps under torch.profiler (a Perfetto trace, the top ops, the shares of the step), "
        "or one op across shapes with --op",
    )
    p.add_argument("config", nargs="?", help="a YAML config, as for `run` (default: the built-in tiny run)")
    p.add_argument("overrides", nargs="*", help="key=value or ~key, as for `run`")
    p.add_argument("--steps", type=int, default=5, help="steps to record (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps run first, unrecorded (default: %(default)s)")
    p.add_argument("--top", type=int, default=15, help="ops to list (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default: <output_dir>/profile)")
    p.add_argument("--op", metavar="NAME", help=f"time one op instead: {', '.join(OPS)}")
    p.add_argument(
        "--shape",
        action="append",
        metavar="AxB...",
        help="with --op: a shape, e.g. 4096x896 for rms_norm (repeatable; default: a set for the device)",
    )
    add_dtype(p, "with --op: ", default="bfloat16 on CUDA, float32 on the CPU")
    add_device(p, "with --op: ")
    p.add_argument("--reps", type=int, default=5, help="with --op on the CPU: timed runs (default: 5)")


def command(args) -> int:
    logger = logging.getLogger("fasttune")
    level = logger.level
    logger.setLevel(logging.INFO)  # say what runs (kernels, attention, AdamW), as `run` does
    try:
        return _profile_op(args) if args.op is not None else _profile_run(args)
    finally:
        logger.setLevel(level)


def _shapes(given: list[str] | None) -> list[tuple[int, ...]] | None:
    if not given:
        return None
    try:
        return [tuple(int(d) for d in s.lower().split("x")) for s in given]
    except ValueError:
        raise FasttuneError(f"--shape: expected sizes joined by x, e.g. 4096x896; got {given}") from None


def _profile_op(args) -> int:
    if args.config is not None or args.overrides:
        raise FasttuneError("profile --op times one op: it takes no config or overrides")
    shapes = _shapes(args.shape)
    from fasttune.profiling.interpreter import interpreter_for_cpu
    from fasttune.profiling.op import check_op, print_op_table, profile_op

    check_op(args.op)  # before Triton's interpreter may start a second process for an op that does not exist

    args.device = device_or_none(args.device)  # None: the library's choice, cuda when available
    rerun = interpreter_for_cpu(args)
    if rerun is not None:
        return rerun
    print_op_table(profile_op(args.op, shapes, args.dtype, args.device, args.reps))
    return 0


def _profile_run(args) -> int:
    from fasttune.profiling.profile import print_report, profile_run
    from fasttune.train.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `fasttune profile key=value ...` with no file
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    report = profile_run(cfg, steps=args.steps, warmup=args.warmup, out_dir=args.out, top=args.top)
    print()
    print_report(report)
    return 0
