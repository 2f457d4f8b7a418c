"""What `fasttune bench` writes: the stamp (where and with what it ran), the markdown table of the
variants, the loss curves' plot, and the three files under the results folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fasttune.version import __version__

# The source checkout this package was imported from, when it was (src/fasttune/bench/report.py): an
# installed wheel has no commit to name.
CHECKOUT = Path(__file__).resolve().parents[3]


def commit() -> str:
    """The short commit of the source checkout fasttune runs from, or "unknown" (e.g. an installed wheel;
    its version is in the stamp)."""
    if not (CHECKOUT / ".git").exists() or not (CHECKOUT / "src" / "fasttune").is_dir():
        return "unknown"
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> dict:
    """The GPU (or "cpu"), the versions, the commit and the date a result was measured with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "fasttune": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "python": sys.version.split()[0],
    }


def table(rows: dict) -> str:
    head = (
        "variant",
        "target tok/s",
        "real tok/s",
        "step ms",
        "peak GiB",
        "MFU",
        "final loss",
        "vs (a)",
        "vs (b)",
        "first step s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, r in rows.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f(r["target_tokens_per_s"], ",.0f"),
                    f(r["real_tokens_per_s"], ",.0f"),
                    f(r["step_ms_median"], ".1f"),
                    f(r["peak_memory_gib"], ".2f"),
                    f(r["mfu"], ".1%"),
                    f(r["final_loss"], ".4f"),
                    f(r.get("vs_a"), ".2f") + "x",
                    f(r.get("vs_b"), ".2f") + "x",
                    f(r["first_step_s"], ".1f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1)
    ax.set_xlabel("optimizer step (32 examples)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write(stem: Path, report: dict, rows: dict, curves: dict) -> str | None:
    """`stem`.json (the report), .md (the table) and .png (the loss curves); returns why there is no
    plot, or None."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(rows)
    stem.with_suffix(".md").write_text(f"{report['model']}, {report['gpu']}, {report['commit']}\n\n{md}\n")
    return plot(curves, stem.with_suffix(".png"))
