"""The `fasttune` command: the root parser, the commands' registry and the one way errors end a command.

Every command is a module of this package with `add_subparser(sub)` (its arguments, built from literals
and `fasttune.choices` only, so that `--help` imports no torch) and `command(args) -> int` (which imports
the library it calls). Bad input (FasttuneError, OSError) is one line and exit status 2; anything else is a
bug: one line, exit status 1, and the traceback behind -v."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fasttune.cli import bench, data, info, plan, profile, run
from fasttune.cli import eval as eval_
from fasttune.cli import export as export_
from fasttune.cli import generate as generate_
from fasttune.errors import FasttuneError

COMMANDS = (info, data, run, profile, generate_, eval_, export_, plan, bench)  # in `fasttune --help`'s order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttune", description="Fast fine-tuning of Qwen-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fasttune decides")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_subparser(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["bench"]:  # every argument goes to the benchmark's own parser (see cli/bench.py)
        return argparse.Namespace(command="bench", args=argv[1:], verbose=False, argv=argv)
    parser = build_parser()
    # `run`'s key=value overrides may come after options (`run cfg.yaml --nproc 4 lr=1e-4`), which argparse
    # cannot assign to a positional once an option has interrupted it: collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "run" or not all("=" in a or a.startswith("~") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides.extend(extra)
    args.argv = argv
    return args


def _command_module(name: str):
    return next(m for m in COMMANDS if m.__name__.rsplit(".", 1)[-1] == name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    verbose = args.verbose or args.command == "run"  # a run says what it chose (backends, kernels, AdamW)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 speaks for all; the rest only warn
        verbose = False
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        return _command_module(args.command).command(args)
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


if __name__ == "__main__":
    sys.exit(main())
