"""`fasttune bench`: fasttune against the Hugging Face baseline, in one process, on the same steps.

    fasttune bench --model qwen2.5-0.5b --tokens 200000            # random weights of a named shape
    fasttune bench --model /path/to/Qwen2.5-0.5B-Instruct --data my.jsonl --variants hf_padded fasttune
    fasttune bench --model tiny --device cpu --variants fasttune_torch --tokens 4000   # a CPU smoke run

Each variant trains the same plan of steps (32 examples per step, truncated at 128 tokens, the built-in
corpus or a JSONL file, tokenized with the model's tokenizer or the bundled Qwen2.5 one for named shapes)
and reports target and real tokens/s, step time, peak memory, MFU (from the GPU's peak in
fasttune.train.metrics), the loss after the same tokens, and ratios to `hf_padded` (a) and `hf_padding_free`
(b). Warm-up steps are excluded; the first step's time (compilation included) is reported apart. Results
go to <results>/<gpu>/e2e/<model>.{json,md,png}, stamped with the GPU, versions and commit; a source
checkout keeps its committed ones with `--results benchmarks/results`.

This module's import needs no torch, so `fasttune bench --help` answers at once; the runners load after
the arguments parse.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fasttune.errors import FasttuneError

VARIANTS = ("hf_padded", "hf_padding_free", "fasttune", "fasttune_torch", "fasttune_compile", "fasttune_lora")
TINY = "tiny"  # the built-in tiny Qwen2 on the built-in corpus (fasttune.bench.workloads.tiny_workload)
# Relative to the working directory, so that it works wherever fasttune is installed.
DEFAULT_RESULTS = Path("fasttune-bench")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttune bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="qwen2.5-0.5b",
        help="a model folder, a named shape of `fasttune plan` (random weights, e.g. qwen2.5-0.5b), or "
        f"'{TINY}' (the built-in tiny Qwen2, for the CPU) (default: %(default)s)",
    )
    p.add_argument("--data", help="a JSONL file (default: the built-in corpus)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup", type=int, default=5, help="steps not measured (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="folder for <gpu>/e2e/<model>.{json,md,png} (default: ./%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, argparse's message printed): a status
        return int(e.code or 0)
    if args.tokens < 1 or args.warmup < 0:
        raise FasttuneError(
            f"bench: --tokens must be >= 1 and --warmup >= 0 (got {args.tokens}, {args.warmup})"
        )
    if args.data is not None and not Path(args.data).is_file():
        raise FasttuneError(f"bench: --data {args.data}: no such file")
    return run(args)


def _needs_transformers(args, shapes) -> None:
    """The Hugging Face variants and the random checkpoints of named shapes are transformers': one clear
    error before anything trains when it is not installed (fasttune itself does not depend on it)."""
    hf = [v for v in args.variants if v.startswith("hf_")]
    if not hf and args.model not in shapes:
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        what = f"the variants {', '.join(hf)}" if hf else f"--model {args.model} (random weights)"
        raise FasttuneError(
            f"bench: {what} need transformers (pip install transformers); without it, run fasttune's own "
            f"variants on a model folder or --model {TINY}"
        ) from None


def run(args) -> int:
    import torch

    from fasttune.bench import report, runners, workloads

    shapes = workloads.SHAPES
    if args.model not in (*shapes, TINY) and not Path(args.model).is_dir():
        raise FasttuneError(
            f"bench: --model {args.model}: not a model folder, '{TINY}' nor a named shape "
            f"({', '.join(shapes)})"
        )
    _needs_transformers(args, shapes)
    from fasttune.devices import resolve_device

    device = resolve_device(args.device or "auto", "bench: --device")  # a bad or absent device: one line
    dtype = getattr(torch, args.dtype)
    info = report.stamp()
    if device.type == "cpu":  # measured, unlike the ops harness's smoke runs: CPU timings, labelled as such
        info["gpu"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data, plan = _workload(args, Path(tmp), dtype)
        print(
            f"{len(plan.steps)} steps of {runners.BATCH} examples, {data.lengths.mean():.1f} tokens each on "
            f"average, fasttune bucket {plan.bucket} tokens",
            flush=True,
        )
        results = {}
        for name in args.variants:
            torch.manual_seed(args.seed)
            r = _variant(name, model_dir, data, plan, device, dtype, args.warmup)
            results[r.name] = r
            torch.cuda.empty_cache() if device.type == "cuda" else None
            print(f"  {r.name}: done, final loss {r.losses[-1]:.4f}", flush=True)
    rows = _rows(results, runners.peak_for(device))
    stem = args.results / info["gpu"].replace(" ", "_") / "e2e" / Path(args.model).name
    out = {
        **info,
        "model": args.model,
        "tokens": args.tokens,
        "steps": len(plan.steps),
        "bucket": plan.bucket,
        "results": rows,
        "losses": {n: r.losses for n, r in results.items()},
    }
    note = report.write(stem, out, rows, out["losses"])
    print(report.table(rows))
    print(note or f"wrote {stem}.json, .md and .png")
    return 0


def _workload(args, tmp: Path, dtype):
    """The checkpoint (written under `tmp` unless a folder was given), the tokenized data and the plan."""
    from fasttune.bench import runners, workloads

    if args.model == TINY:
        model_dir, data, _ = workloads.tiny_workload(tmp, seed=args.seed)
        if args.data:
            data = workloads.tokenized(model_dir, args.data, args.seed)
    else:
        model_dir = Path(args.model)
        if args.model in workloads.SHAPES:
            model_dir = workloads.random_checkpoint(args.model, tmp / args.model, dtype)
        data = workloads.tokenized(model_dir, args.data, args.seed)
    plan = runners.StepPlan.make(data, args.tokens, args.seed)
    if len(plan.steps) <= args.warmup:
        raise FasttuneError(
            f"bench: --tokens {args.tokens} plan {len(plan.steps)} step(s) of {runners.BATCH} examples, "
            f"no more than --warmup {args.warmup}: nothing would be measured; raise --tokens or lower "
            "--warmup"
        )
    return model_dir, data, plan


def _variant(name, model_dir, data, plan, device, dtype, warmup):
    from fasttune.bench import runners

    if name.startswith("hf_"):
        liger = name == "hf_padding_free" and _liger_installed()
        return runners.run_hf(
            model_dir, data, plan, device, dtype, name == "hf_padding_free", warmup, liger=liger
        )
    return runners.run_fasttune(
        model_dir,
        data,
        plan,
        device,
        dtype,
        warmup,
        kernels="torch" if name == "fasttune_torch" else "auto",
        compile=name == "fasttune_compile",
        lora=name == "fasttune_lora",
    )


def _rows(results: dict, peak: float | None) -> dict:
    """Each variant's summary, with its speed relative to the two baselines (vs_a, vs_b)."""
    flops = next((r.extra["flops_per_token"] for r in results.values() if "flops_per_token" in r.extra), None)
    rows = {n: r.summary(flops or 0.0, peak) for n, r in results.items()}
    for base, key in (("hf_padded", "vs_a"), ("hf_padding_free", "vs_b")):
        b = next((rows[n]["target_tokens_per_s"] for n in rows if n.startswith(base)), None)
        for row in rows.values():
            row[key] = row["target_tokens_per_s"] / b if b else None
    return rows


def _liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True
