"""Host memory of a short CPU run, phase by phase, on a scaled-down Qwen2.5-0.5B (its vocabulary and
widths, fewer layers), against the planner's host prediction.

    python benchmarks/memory/host_memory.py --layers 2 --tokens 2048 --method full [--kernels torch]

Phases (each the high-water mark of RSS since the previous phase ended, /proc/self/status VmHWM reset by
clear_refs): start (Python, torch, fasttune imported), load (the model read), steps (the optimizer steps),
end (the last checkpoint, the test loss, the exported model and the evaluation report).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from fasttune.data import synth
from fasttune.data.records import write_jsonl
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.models.tokenizer import write_builtin_tokenizer
from fasttune.models.weights import save_model
from fasttune.plan.tables import SHAPES
from fasttune.profiling.host_memory import peak_rss_bytes, reset_peak, rss_bytes
from fasttune.train import loop as train
from fasttune.train.config import load_config

GIB = 2**30


def scaled_qwen(folder: Path, layers: int, seed: int = 0) -> None:
    """Qwen2.5-0.5B's config with `layers` decoder layers, random weights, saved in bf16 as published."""
    hf = dict(SHAPES["qwen2.5-0.5b"], num_hidden_layers=layers, dtype="bfloat16")
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf(hf, "scaled Qwen2.5-0.5B"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model.to(torch.bfloat16), folder)
    write_builtin_tokenizer(folder)


def measure(root: Path, overrides: list[str]) -> dict:
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = max(phases.get(name, 0.0), peak_rss_bytes() / GIB)
        reset_peak()

    mark("start")
    cfg = load_config(None, [f"output_dir={root / 'out'}", *overrides])
    first = {"done": False}

    def on_step(step: int, record: dict) -> None:
        mark("load + step 1" if not first["done"] else "steps")
        first["done"] = True

    result = train.run(cfg, on_step=on_step)
    mark("end (save, test loss, export, report)")
    return {"phases_gib": phases, "steps": result.step, "rss_after_gib": rss_bytes() / GIB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="micro_batch_tokens")
    p.add_argument("--method", default="full")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--examples", type=int, default=200, help="end-of-run generations (eval_examples)")
    p.add_argument("overrides", nargs="*", help="more run overrides, key=value")
    args = p.parse_args(argv)
    if not reset_peak():
        print("this kernel does not let a process reset its VmHWM: phases cannot be told apart")
        return 1
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        scaled_qwen(root / "model", args.layers)
        write_jsonl(root / "data.jsonl", synth.generate(400, seed=1))
        overrides = [
            f"model={root / 'model'}",
            f"data.files=[{root / 'data.jsonl'}]",
            "device=cpu",
            f"method={args.method}",
            f"micro_batch_tokens={args.tokens}",
            f"max_seq_len={min(args.tokens, 2048)}",
            f"max_steps={args.steps}",
            f"eval_examples={args.examples}",
            "samples=0",
            *args.overrides,
        ]
        out = measure(root, overrides)
        print("measured: " + json.dumps(out), flush=True)
        from fasttune.plan.host import host_plan_for_config

        plan = host_plan_for_config(load_config(None, [f"output_dir={root / 'out'}", *overrides]))
        out["planned_gib"] = {k: getattr(plan, k) / GIB for k in ("load", "step", "end", "peak")}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
