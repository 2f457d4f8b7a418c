"""The regression gate CI runs on the CPU (and, with the thresholds stored for it, on a GPU):

    python benchmarks/e2e/gate.py [--device cuda]

What it measures is `fasttune.bench.gate.measure` (fasttune against the Hugging Face baseline on a tiny
Qwen2, in this one process); the bounds are this folder's `thresholds.json`, one set per device. A failure
names the counter, its value and its threshold, and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fasttune.bench.gate import check, measure

THRESHOLDS = Path(__file__).parent / "thresholds.json"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="fasttune's regression gate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--regress", choices=["no_packing"], help="switch a known regression on (for tests)")
    args = parser.parse_args(argv)
    stored = json.loads(THRESHOLDS.read_text())
    key = "cpu" if args.device == "cpu" else torch.cuda.get_device_name()
    if key not in stored:
        print(f"gate: no thresholds stored for {key!r} in {THRESHOLDS} (known: {', '.join(stored)})")
        return 2
    measured = measure(args.regress, args.device)
    print(json.dumps({k: v for k, v in measured.items() if not isinstance(v, dict)}, indent=1))
    failures = check(measured, stored[key])
    for f in failures:
        print(f"REGRESSION: {f}")
    print("gate: " + ("FAILED" if failures else f"passed ({len(stored[key])} checks against {key})"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
