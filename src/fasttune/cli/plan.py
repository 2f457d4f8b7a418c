"""`fasttune plan`: memory per GPU and time per epoch for a model, method, batch and GPU, before anything
is downloaded or run (fasttune/plan/estimate.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fasttune.choices import ATTENTION, KERNELS, METHODS, PRECISIONS, STRATEGIES
from fasttune.errors import FasttuneError

# The planner models a chosen kernel and attention path: "auto" is for a run, which decides on its device.
_KERNELS = tuple(k for k in KERNELS if k != "auto")
_ATTENTION = tuple(a for a in ATTENTION if a != "auto")


def add_subparser(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU and time per epoch for a model, method, batch and GPU")
    p.add_argument(
        "--model",
        required=True,
        help="a model folder or a named shape, e.g. qwen2.5-7b (an unknown name lists them)",
    )
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument(
        "--gpu", default="rtx4090", help="a GPU, e.g. h100 (an unknown name lists them; default: %(default)s)"
    )
    p.add_argument("--nproc", type=int, default=1, help="GPUs (default: %(default)s)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP: shards and optimizer on the host")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="all GPUs (default: %(default)s)")
    p.add_argument(
        "--micro-batch-tokens", type=int, help="per GPU per forward (default: tokens per step / nproc)"
    )
    p.add_argument("--seq-len", type=float, help="mean tokens per document (default: the data's, else 2048)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="for --data JSONL (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kernels", choices=_KERNELS, default="triton")
    p.add_argument("--attention", choices=_ATTENTION, default="sdpa", help="flash: flash-attn installed")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", help="module names (default: LoRA's default targets)")
    p.add_argument("--dataset-tokens", type=float, help="tokens in the training data (one epoch)")
    p.add_argument("--data", type=Path, help="a prepared data folder (prepare.json) or a JSONL file")
    p.add_argument("--mfu", type=float, help="use this MFU (0-1) instead of a measured or assumed one")
    p.add_argument(
        "--results", type=Path, help="where measured MFUs are looked for (default: the benchmark results)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def command(args) -> int:
    from fasttune.plan import estimate
    from fasttune.plan.memory import Shape

    config, name = estimate.resolve_model(args.model)
    gpu = estimate.resolve_gpu(args.gpu)
    if args.nproc < 1 or args.tokens_per_step < 1 or (args.mfu is not None and not 0 < args.mfu <= 1):
        raise FasttuneError("--nproc and --tokens-per-step must be >= 1, and --mfu in (0, 1]")
    if args.dataset_tokens is not None and args.data is not None:
        raise FasttuneError("give --dataset-tokens or --data, not both")
    micro = args.micro_batch_tokens or math.ceil(args.tokens_per_step / args.nproc)
    epoch_tokens, source, seq_len = args.dataset_tokens, "--dataset-tokens", args.seq_len
    if args.data is not None:
        folder = Path(args.model) if Path(args.model).is_dir() else None
        epoch_tokens, mean, source = estimate.data_tokens(args.data, folder, args.max_seq_len, micro)
        seq_len = seq_len or mean
    o = _options(args, micro, seq_len or 2048.0)
    shape = Shape.of(config, o.lora, name)
    results = args.results if args.results is not None else estimate.RESULTS
    plan = estimate.make_plan(shape, o, gpu, None, epoch_tokens, source, args.mfu, results)
    hints = estimate.hints(shape, o, gpu, plan)
    if args.json:
        print(json.dumps(plan.to_json() | {"hints": hints}, indent=2))
    else:
        print(estimate.format_plan(plan, hints))
    return 0


def _options(args, micro: int, seq_len: float):
    from fasttune.models.lora import LoraConfig
    from fasttune.plan.memory import Options

    targets = LoraConfig().targets if args.lora_targets is None else tuple(args.lora_targets)
    return Options(
        method=args.method,
        precision=args.precision,
        micro_batch_tokens=micro,
        tokens_per_step=args.tokens_per_step,
        seq_len=seq_len,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        kernels=args.kernels,
        attention=args.attention,
        nproc=args.nproc,
        strategy=args.strategy,
        cpu_offload=args.cpu_offload,
        lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=args.lora_dropout, targets=targets),
    )
