"""The CLI's shape: one module per command registered the same way, shared options with one default, and
parsers that are built without importing torch (`fasttune --help` answers at once)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fasttune.cli import main as cli_main

# `fasttune bench` is left out: its parser lives in fasttune.bench.cli (built without torch there).
HELP_COMMANDS = ["", "info", "data", "data prepare", "run", "profile", "generate", "eval", "export", "plan"]

PROBE = """
import sys
from fasttune.cli.main import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: c or "fasttune")
def test_help_does_not_import_torch(command):
    argv = [*command.split(), "--help"]
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    usage, _, verdict = out.stdout.rstrip().rpartition("\n")
    assert f"usage: fasttune {command}".rstrip() in usage  # the help was printed, for that command
    assert verdict == "False", f"`fasttune {command} --help` imported torch"


def test_every_command_module_registers_the_same_way():
    names = []
    for module in cli_main.COMMANDS:
        assert callable(module.add_subparser) and callable(module.command), module.__name__
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        module.add_subparser(sub)
        name = module.__name__.rsplit(".", 1)[-1]
        assert list(sub.choices) == [name], f"{module.__name__} registers {list(sub.choices)}"
        names.append(name)
    root = cli_main.build_parser()
    subparsers = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == names  # the root parser is exactly the registry
    assert {"info", "data", "run", "profile", "generate", "eval", "export", "plan", "bench"} == set(names)


SHARED = ["--seed", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--max-new-tokens"]


def _defaults(argv: list[str]) -> dict:
    args = cli_main.build_parser().parse_args(argv)
    return {k: getattr(args, k) for k in ("seed", "temperature", "top_k", "top_p", "repetition_penalty",
                                           "max_new_tokens", "dtype", "device")}  # fmt: skip


def test_shared_options_have_one_default():
    generate = _defaults(["generate", "--model", "m", "hello"])
    evaluate = _defaults(["eval", "--run", "out"])
    assert generate == evaluate
    assert generate == {
        "seed": 0,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "max_new_tokens": 128,
        "dtype": None,  # as the checkpoint says
        "device": "auto",
    }
    profile = cli_main.build_parser().parse_args(["profile", "--op", "rope"])
    assert (profile.device, profile.dtype) == ("auto", None)
    seeds = {cli_main.parse(argv).seed for argv in (["data", "synth", "--out", "x"], ["data", "prepare", "f",
             "--out", "o"], ["generate", "--model", "m"], ["eval", "--run", "o"])}  # fmt: skip
    assert seeds == {0}
    # One help text each: the option reads the same in every command that has it.
    helps = {}
    for argv in (["generate", "--model", "m"], ["eval", "--run", "o"]):
        args = cli_main.parse(argv)
        sub = next(a for a in cli_main.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        for action in sub.choices[args.command]._actions:
            for flag in set(action.option_strings) & {*SHARED, "--dtype", "--device"}:
                helps.setdefault(flag, set()).add(action.help)
    assert len(helps) == len(SHARED) + 2 and all(len(h) == 1 for h in helps.values()), helps


def test_bad_dtype_is_one_error_line(setup, tmp_path, capsys):
    # --dtype is a free name checked by the library (argparse choices would exit inside the parser): a bad
    # one is the one error line, in export as in generate (test_generate) and profile --op.
    argv = ["export", "--model", str(setup / "model"), "--format", "hf", "--out", str(tmp_path / "o")]
    assert cli_main.main([*argv, "--dtype", "fp8"]) == 2
    assert capsys.readouterr().err == (
        "fasttune: error: --dtype: unknown dtype 'fp8'; use one of float32, bfloat16, float16\n"
    )
    assert not (tmp_path / "o").exists()
