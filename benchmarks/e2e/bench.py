"""`fasttune bench`: fasttune against the Hugging Face baseline, in one process, on the same steps.

    fasttune bench --model qwen2.5-0.5b --tokens 200000            # random weights of a named shape
    fasttune bench --model /path/to/Qwen2.5-0.5B-Instruct --data my.jsonl --variants hf_padded fasttune

Each variant trains the same plan of steps (32 examples per step, truncated at 128 tokens, the built-in
corpus or a JSONL file, tokenized with the model's tokenizer or the bundled Qwen2.5 one for named shapes)
and reports target and real tokens/s, step time, peak memory, MFU (from the GPU's peak in
fasttune.train.metrics), the loss after the same tokens, and ratios to `hf_padded` (a) and `hf_padding_free`
(b). Warm-up steps are excluded; the first step's time (compilation included) is reported apart. Results
go to benchmarks/results/<gpu>/e2e/<name>.{json,md,png}, stamped with the GPU, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "ops"))

from runners import StepPlan, peak_for, run_fasttune, run_hf  # noqa: E402

from fasttune.plan.tables import SHAPES as _PLAN_SHAPES  # noqa: E402

# Published configs of the named shapes (random weights are enough for speed and memory): the planner's
# table, so that `fasttune plan` and `fasttune bench` mean the same model by the same name.
SHAPES = _PLAN_SHAPES
VARIANTS = ("hf_padded", "hf_padding_free", "fasttune", "fasttune_torch", "fasttune_compile", "fasttune_lora")


def random_checkpoint(shape: str, folder: Path, dtype: torch.dtype) -> Path:
    """Random weights of a named shape, with the bundled Qwen2.5 tokenizer, written by transformers."""
    import transformers

    from fasttune.models.tokenizer import write_builtin_tokenizer

    spec = {"max_position_embeddings": 32768, **SHAPES[shape]}
    cfg = transformers.AutoConfig.for_model(**spec)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    write_builtin_tokenizer(folder)
    return folder


def tokenized(model_dir: Path, data_file: str | None, seed: int):
    from fasttune import load_tokenizer
    from fasttune.data import synth
    from fasttune.data.packing import TokenizeOptions, tokenize
    from fasttune.data.records import Example, read_sources

    if data_file:
        examples, _ = read_sources([data_file])
    else:
        examples = [
            Example([{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}])
            for r in synth.generate(36079, seed)
        ]
    data, _ = tokenize(
        examples, load_tokenizer(model_dir), TokenizeOptions(max_seq_len=128, too_long="truncate")
    )
    return data


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


def main(argv: list[str] | None = None) -> int:
    from harness import stamp

    p = argparse.ArgumentParser(prog="fasttune bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help=f"a model folder or a shape: {', '.join(SHAPES)}")
    p.add_argument("--data", help="a JSONL file (default: the built-in corpus)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", type=Path, help="output stem (default benchmarks/results/<gpu>/e2e/<model>)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = stamp()
    if device.type == "cpu":  # measured, unlike the ops harness's smoke runs: CPU timings, labelled as such
        info["gpu"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model)
        if args.model in SHAPES:
            model_dir = random_checkpoint(args.model, Path(tmp) / args.model, dtype)
        data = tokenized(model_dir, args.data, args.seed)
        plan = StepPlan.make(data, args.tokens, args.seed)
        print(
            f"{len(plan.steps)} steps of {32} examples, {data.lengths.mean():.1f} tokens each on average, "
            f"fasttune bucket {plan.bucket} tokens",
            flush=True,
        )
        results = {}
        for name in args.variants:
            torch.manual_seed(args.seed)
            if name.startswith("hf_"):
                liger = name == "hf_padding_free" and _liger_installed()
                r = run_hf(
                    model_dir, data, plan, device, dtype, name == "hf_padding_free", args.warmup, liger=liger
                )
            else:
                r = run_fasttune(
                    model_dir,
                    data,
                    plan,
                    device,
                    dtype,
                    args.warmup,
                    kernels="torch" if name == "fasttune_torch" else "auto",
                    compile=name == "fasttune_compile",
                    lora=name == "fasttune_lora",
                )
            results[r.name] = r
            torch.cuda.empty_cache() if device.type == "cuda" else None
            print(f"  {r.name}: done, final loss {r.losses[-1]:.4f}", flush=True)
    peak = peak_for(device)
    flops = next((r.extra["flops_per_token"] for r in results.values() if "flops_per_token" in r.extra), None)
    rows = {n: r.summary(flops or 0.0, peak) for n, r in results.items()}
    for base, key in (("hf_padded", "vs_a"), ("hf_padding_free", "vs_b")):
        b = next((rows[n]["target_tokens_per_s"] for n in rows if n.startswith(base)), None)
        for row in rows.values():
            row[key] = row["target_tokens_per_s"] / b if b else None
    name = Path(args.model).name
    stem = args.out or HERE.parent / "results" / info["gpu"].replace(" ", "_") / "e2e" / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **info,
        "model": args.model,
        "tokens": args.tokens,
        "steps": len(plan.steps),
        "bucket": plan.bucket,
        "results": rows,
        "losses": {n: r.losses for n, r in results.items()},
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(rows)
    stem.with_suffix(".md").write_text(f"{args.model}, {info['gpu']}, {info['commit']}\n\n{md}\n")
    note = plot({n: r.losses for n, r in results.items()}, stem.with_suffix(".png"))
    print(md)
    print(note or f"wrote {stem}.json, .md and .png")
    return 0


def _liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
