"""Triton's interpreter for the commands that run Triton kernels on the CPU (`fasttune profile --op`)."""

from __future__ import annotations

import os
import subprocess
import sys

from fasttune.devices import resolve_device
from fasttune.errors import FasttuneError


def interpreter_for_cpu(args) -> int | None:
    """On the CPU the Triton kernels run through Triton's interpreter, which must be chosen before triton
    is imported: triton.language's own @jit helpers are built at import time, and a kernel interpreted
    later cannot call them ("Cannot call @triton.jit'd outside of the scope of a kernel"). torch imports
    triton when fasttune is imported, so a process that did not start with TRITON_INTERPRET=1 runs this
    command again in a child process that does. Returns the child's exit status, or None to go on here.

    `args` are `fasttune profile --op`'s (op, device, and argv, the command line as `cli.main` got it)."""
    device = str(resolve_device(args.device or "auto", "--device"))
    if not str(device).startswith("cpu"):
        return None
    value = os.environ.get("TRITON_INTERPRET")
    if value == "1":
        return None
    if value is not None:
        raise FasttuneError(
            f"profile --op {args.op} on the CPU runs the Triton kernels through Triton's interpreter, but "
            f"TRITON_INTERPRET={value} turns it off: unset it or set TRITON_INTERPRET=1"
        )
    if "triton.language" not in sys.modules:  # nothing built yet: choosing it now is in time
        os.environ["TRITON_INTERPRET"] = "1"
        print("profile --op on the CPU: set TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        return None
    argv = getattr(args, "argv", None)
    if argv is None:
        raise FasttuneError(
            f"profile --op {args.op} on the CPU needs Triton's interpreter, chosen before triton is "
            "imported: set TRITON_INTERPRET=1 in the environment"
        )
    print(
        "profile --op on the CPU: running again with TRITON_INTERPRET=1 (Triton's interpreter, which must "
        "be chosen before triton is imported)",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "fasttune.cli", *argv], env=env).returncode
