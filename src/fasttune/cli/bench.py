"""`fasttune bench`: fasttune against the Hugging Face baseline. Every argument after `bench` goes to the
benchmark's own parser (fasttune/bench/cli.py), `--help` included."""

from __future__ import annotations

import argparse


def add_subparser(sub) -> None:
    # Listed for `fasttune --help`; main.py hands `bench ...` over before parsing, because argparse cannot
    # pass options such as --help through to a REMAINDER positional.
    p = sub.add_parser(
        "bench", add_help=False, help="fasttune against the Hugging Face baseline (see fasttune bench --help)"
    )
    p.add_argument("args", nargs=argparse.REMAINDER)


def command(args) -> int:
    from fasttune.bench.cli import main

    try:
        return main(list(args.args))
    except SystemExit as e:  # its parser's --help and usage errors: the status, as every command returns
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)  # as Python exits
