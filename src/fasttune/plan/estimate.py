"""`fasttune plan`: what fine-tuning a model needs, before anything is downloaded or run.

    fasttune plan --model qwen2.5-7b --method qlora --gpu rtx4090 --tokens-per-step 16384
    fasttune plan --model path/to/folder --method full --gpu rtx4090 --nproc 8 --strategy fsdp --json

Memory: see fasttune/plan_memory.py, which holds the formulas.

Time per epoch: FLOPs per token as `metrics.flops_per_token` counts them (6 N + attention; 4 N for LoRA and
QLoRA, whose frozen weights need no weight gradient), plus the recomputed forward (2 N + a third of the
attention) with activation checkpointing; tokens per epoch from --dataset-tokens, a prepared data folder
(prepare.json: its train tokens over its packing efficiency) or a JSONL file tokenized and packed here; and
an MFU. No GPU measurement exists in this repository yet, so the default MFU is an assumption (see
ASSUMED_MFU), labelled as such; `--mfu` overrides it, and a measured value is used when one is found.

Measured MFU: any JSON file under --results DIR (none by default: see RESULTS) with a top-level list
"mfu_measurements" of records {"gpu": str (as torch.cuda.get_device_name), "method": full|lora|qlora,
"mfu": float in (0, 1]} and optionally "model" (a shape name or folder name), "activation_checkpointing",
"compile", "micro_batch_tokens", "commit", "date" (ISO). The record for the same GPU and method that also
matches the most of model / activation checkpointing / compile is used, the latest date breaking ties.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fasttune.choices import METHODS
from fasttune.errors import FasttuneError
from fasttune.models.lora import LoraConfig
from fasttune.models.model import CausalLM, ModelConfig
from fasttune.plan.memory import GIB, Options, Row, Shape, choose_strategy, memory_rows
from fasttune.plan.tables import GPU, GPUS, SHAPES

# Assumed MFU (model FLOPs over the dense bf16 peak) while nothing is measured. Published large-scale
# training runs report 21-46% (Chowdhery et al. 2022, "PaLM", Table 3: GPT-3 21.3%, Gopher 32.5%,
# Megatron-Turing NLG 30.2%, PaLM 46.2%); 35% is taken for full and LoRA fine-tuning with fused kernels.
# QLoRA dequantises every weight twice per micro-batch and runs its base GEMMs unfused: 25%, a guess.
ASSUMED_MFU = {"full": 0.35, "lora": 0.35, "qlora": 0.25}
MFU_SOURCE = (
    "assumed: the PaLM paper (Table 3) reports 21-46% for large-scale training; no measured MFU "
    "(none is shipped; --results DIR names a folder of measurements)"
)
FIT_SHARE = 0.95
# Where measured MFUs are looked for by default: nowhere. The package ships no measurements (none exist
# yet), and a source checkout's benchmarks/ is absent from an installed wheel, so a default pointing into
# it would plan differently by how fasttune was installed; `--results DIR` names a folder of them.
RESULTS: Path | None = None


def resolve_model(model: str) -> tuple[ModelConfig, str]:
    """A named shape or a model folder (its config.json) -> (ModelConfig, name)."""
    from fasttune.models.weights import read_config

    if model.lower() in SHAPES:
        return ModelConfig.from_hf(dict(SHAPES[model.lower()]), f"shape {model}"), model.lower()
    path = Path(model)
    if path.is_dir() or path.name == "config.json":
        return read_config(path), path.name
    raise FasttuneError(f"--model {model}: not a model folder nor a known shape ({', '.join(SHAPES)})")


def resolve_gpu(name: str) -> GPU:
    key = name.lower().replace(" ", "").replace("_", "-")
    if key in GPUS:
        return GPUS[key]
    raise FasttuneError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)}")


def gpu_key_for_device_name(name: str, memory_gib: float | None = None) -> str | None:
    """The table entry for a torch device name: the longest label it contains ("H100 PCIe" over "H100"),
    and for the A100 the entry nearest the memory."""
    hits = [k for k, g in GPUS.items() if g.label.lower() in name.lower()]
    if not hits:
        return None
    longest = max(len(GPUS[k].label) for k in hits)
    hits = [k for k in hits if len(GPUS[k].label) == longest]
    if memory_gib is not None:
        return min(hits, key=lambda k: abs(GPUS[k].memory_gib - memory_gib))
    return hits[0]


# ----------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    model: str
    method: str
    gpu: str
    gpu_memory_gib: float
    nproc: int
    strategy: str
    parameters: int
    trainable: int
    rows: list[Row]
    total_bytes: float
    verdict: str  # fits | tight | does not fit
    host_bytes: float  # per process, with cpu_offload
    flops_per_token: float
    mfu: float | None
    mfu_source: str
    tokens_per_s: float | None
    seconds_per_step: float | None
    epoch_tokens: float | None
    epoch_source: str
    seconds_per_epoch: float | None
    options: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rows"] = {r.part: {"gib": r.bytes / GIB, "note": r.note} for r in self.rows}
        d["total_gib"] = self.total_bytes / GIB
        return d


def measured_mfu(gpu: GPU, o: Options, model: str, results: Path | None) -> tuple[float, str, dict] | None:
    """The best-matching measured MFU under `results` (see the module docstring), or None."""
    if results is None or not results.is_dir():
        return None
    best = None
    for f in sorted(results.rglob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        records = data.get("mfu_measurements") if isinstance(data, dict) else None
        for rec in records if isinstance(records, list) else []:
            if not isinstance(rec, dict) or not isinstance(rec.get("gpu"), str):
                continue
            mfu = rec.get("mfu")
            if rec.get("method") != o.method or not isinstance(mfu, int | float) or not 0 < mfu <= 1:
                continue
            key = gpu_key_for_device_name(rec["gpu"])
            if key is None or GPUS[key].label != gpu.label:
                continue
            score = (
                (rec.get("model") == model)
                + (bool(rec.get("activation_checkpointing")) == o.activation_checkpointing)
                + (bool(rec.get("compile")) == o.compile),
                str(rec.get("date", "")),
            )
            if best is None or score > best[0]:
                best = (
                    score,
                    float(mfu),
                    f"measured: {f.name} ({rec['gpu']}, {rec.get('date', 'no date')})",
                    rec,
                )
    return None if best is None else best[1:]


def make_plan(
    shape: Shape,
    o: Options,
    gpu: GPU,
    gpu_memory_gib: float | None = None,
    epoch_tokens: float | None = None,
    epoch_source: str = "",
    mfu: float | None = None,
    results: Path | None = RESULTS,
) -> Plan:
    if o.method not in METHODS:
        raise FasttuneError(f"method must be one of {', '.join(METHODS)}, got {o.method!r}")
    memory = (gpu_memory_gib or gpu.memory_gib) * GIB
    strategy = choose_strategy(shape, o, memory)
    rows, host = memory_rows(shape, o, strategy)
    total = sum(r.bytes for r in rows)
    verdict = "fits" if total <= FIT_SHARE * memory else "tight" if total <= memory else "does not fit"

    from fasttune.train.metrics import flops_per_token

    with torch.device("meta"):
        fpt = flops_per_token(CausalLM(shape.config), o.seq_len, lora=o.method != "full")
    attention = fpt - (6 if o.method == "full" else 4) * shape.matmul
    hw = fpt + (2 * shape.matmul + attention / 3 if o.activation_checkpointing else 0.0)
    notes = []
    if mfu is not None:
        source, measured_ac = "given (--mfu)", False
    else:
        found = measured_mfu(gpu, o, shape.name, results)
        if found is not None:
            mfu, source, rec = found
            measured_ac = bool(rec.get("activation_checkpointing")) == o.activation_checkpointing
        else:
            mfu, source, measured_ac = ASSUMED_MFU[o.method], MFU_SOURCE, False
    # An MFU counts model FLOPs; the recomputed forward of activation checkpointing is extra work at the
    # same utilisation, unless the measurement already had it on.
    cost = fpt if measured_ac or not o.activation_checkpointing else hw
    n_gpus = max(1, o.nproc)
    tps = n_gpus * gpu.tflops * 1e12 * mfu / cost
    step_tokens = o.tokens_per_step or o.micro_batch_tokens * n_gpus
    if not gpu.bf16:
        notes.append(f"{gpu.label} has no bf16 tensor cores: fasttune's bf16 runs far below this peak")
    if strategy != "single" and o.nproc > 1:
        notes.append("time assumes communication fully overlapped with compute (not modelled)")
    if strategy == "fsdp" and o.cpu_offload:
        notes.append("cpu_offload: AdamW steps on the CPU and every step crosses PCIe (not in the time)")
    return Plan(
        model=shape.name,
        method=o.method,
        gpu=gpu.label,
        gpu_memory_gib=memory / GIB,
        nproc=o.nproc,
        strategy=strategy,
        parameters=shape.total,
        trainable=shape.total if o.method == "full" else shape.lora,
        rows=rows,
        total_bytes=total,
        verdict=verdict,
        host_bytes=host,
        flops_per_token=fpt,
        mfu=mfu,
        mfu_source=source,
        tokens_per_s=tps,
        seconds_per_step=step_tokens / tps,
        epoch_tokens=epoch_tokens,
        epoch_source=epoch_source,
        seconds_per_epoch=epoch_tokens / tps if epoch_tokens else None,
        options={k: v for k, v in asdict(o).items() if k != "lora"} | {"lora": asdict(o.lora)},
        notes=notes,
    )


def hints(shape: Shape, o: Options, gpu: GPU, plan: Plan) -> list[str]:
    """What would make a plan fit: activation checkpointing, FSDP, CPU offload, the largest micro-batch."""
    if plan.verdict == "fits":
        return []

    def total(opts: Options, strategy: str = plan.strategy) -> tuple[float, float]:
        rows, host = memory_rows(shape, opts, strategy)
        return sum(r.bytes for r in rows), host

    out = []
    memory = plan.gpu_memory_gib * GIB
    if not o.activation_checkpointing:
        ac = total(replace(o, activation_checkpointing=True))[0]
        out.append(f"with activation_checkpointing: {ac / GIB:.1f} GiB")
    if plan.strategy == "ddp":
        out.append(f"with strategy fsdp: {total(o, 'fsdp')[0] / GIB:.1f} GiB")
    if plan.strategy == "fsdp" and not o.cpu_offload:
        gpu_bytes, host = total(replace(o, cpu_offload=True))
        out.append(
            f"with cpu_offload: {gpu_bytes / GIB:.1f} GiB, and {host / GIB:.1f} GiB of host memory per GPU"
        )
    lo, hi = 0, o.micro_batch_tokens // 256 + 1  # in units of 256 tokens; activations grow linearly
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(replace(o, micro_batch_tokens=256 * mid))[0] <= FIT_SHARE * memory:
            lo = mid
        else:
            hi = mid
    out.append(
        f"largest micro_batch_tokens that fits as planned: {256 * lo:,}" if lo else "no micro-batch fits"
    )
    if o.method == "full":
        out.append("method lora or qlora freezes the base: no gradients or AdamW states for it")
    return out


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan, extra: list[str] = ()) -> str:
    o = plan.options
    lines = [
        f"plan: {plan.model}, {plan.parameters / 1e6:,.1f}M parameters, {plan.method} "
        f"({plan.trainable / 1e6:,.2f}M trainable), precision {o['precision']}, kernels {o['kernels']}, "
        f"attention {o['attention']}",
        f"  {plan.nproc} x {plan.gpu} ({plan.gpu_memory_gib:.0f} GiB)"
        + (f", {plan.strategy}" if plan.nproc > 1 else "")
        + f"; {o['micro_batch_tokens']:,} tokens per micro-batch per GPU; activation checkpointing "
        f"{'on' if o['activation_checkpointing'] else 'off'}, compile {'on' if o['compile'] else 'off'}",
        "memory estimate per GPU:",
    ]
    for r in plan.rows:
        lines.append(f"  {r.part:15s} {r.bytes / GIB:8.2f} GiB  {r.note}")
    lines.append(
        f"  {'total':15s} {plan.total_bytes / GIB:8.2f} GiB  of {plan.gpu_memory_gib:.0f}: {plan.verdict}"
    )
    if plan.host_bytes:
        lines.append(f"  host memory per process: {plan.host_bytes / GIB:.2f} GiB (cpu_offload)")
    lines += [f"  hint: {h}" for h in extra]
    lines.append(
        f"time: {plan.flops_per_token / 1e9:.2f} GFLOP per token at {o['seq_len']:.0f} tokens per document; "
        f"MFU {plan.mfu:.0%} ({plan.mfu_source})"
    )
    lines.append(
        f"  {plan.tokens_per_s:,.0f} tokens/s on {plan.nproc} GPU(s); "
        f"{_duration(plan.seconds_per_step)} per optimizer step"
    )
    if plan.seconds_per_epoch is not None:
        epoch = _duration(plan.seconds_per_epoch)
        lines.append(f"  epoch: {plan.epoch_tokens:,.0f} tokens ({plan.epoch_source}): {epoch}")
    else:
        lines.append("  epoch: give --dataset-tokens N or --data PATH for the time per epoch")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Tokens per epoch


def data_tokens(
    path: Path, tokenizer_dir: Path | None, max_seq_len: int, budget: int
) -> tuple[float, float, str]:
    """(tokens computed per epoch, mean tokens per document, where from) for a prepared data folder
    (prepare.json: the train split) or a JSONL file (tokenized with the model's tokenizer, or the bundled
    Qwen2.5 one, and packed into `budget`-token micro-batches as the loop packs them)."""
    from fasttune.models.weights import read_json

    for report in (path / "prepare.json", path / "data" / "prepare.json"):
        if path.is_dir() and report.is_file():
            d = read_json(report)
            try:
                train, eff = d["splits"]["train"], float(d["packing"]["efficiency"])
                tokens, examples = float(train["tokens"]), int(train["examples"])
            except (KeyError, TypeError, ValueError):
                raise FasttuneError(f"{report}: no splits.train.tokens / packing.efficiency") from None
            return tokens / eff, tokens / max(1, examples), f"{report}: train split / {eff:.1%} packing"
    if not path.is_file():
        raise FasttuneError(f"--data {path}: not a JSONL file or a folder with prepare.json")
    from fasttune.data.packing import TokenizeOptions, pack_bfd, packing_efficiency, tokenize
    from fasttune.data.records import read_sources
    from fasttune.models.tokenizer import builtin_tokenizer, load_tokenizer

    tok = (
        load_tokenizer(tokenizer_dir)
        if tokenizer_dir and (tokenizer_dir / "tokenizer.json").exists()
        else None
    )
    tok = tok or builtin_tokenizer()
    examples, _ = read_sources([str(path)])
    data, _ = tokenize(examples, tok, TokenizeOptions(max_seq_len=max_seq_len, too_long="drop"))
    bins = pack_bfd(data.lengths, budget)
    eff = packing_efficiency(data.lengths, bins, budget)
    tokens = float(data.lengths.sum())
    source = f"{path.name}: {len(data):,} examples, all of them, {eff:.1%} packing at {budget:,}"
    return tokens / eff, tokens / max(1, len(data)), source


# ----------------------------------------------------------------------------------------------------------
# `fasttune run --dry-run` and `fasttune plan`


def plan_for_run(
    cfg, config: ModelConfig, name: str, nproc: int, gpu: str | None, mean_doc_len: float, examples: int
) -> str:
    """The plan for a run config (dry run): its method, precision, batch, options and strategy; the GPU
    given, else the one here, else an RTX 4090; epoch tokens from its data's size and sampled mean."""
    notes = []
    memory = None
    if gpu is not None:
        g = resolve_gpu(gpu)
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = props.total_memory / GIB
        key = gpu_key_for_device_name(props.name, memory)
        if key is None:
            raise FasttuneError(
                f"GPU {props.name} is not in the planner's table: pass --gpu NAME ({', '.join(GPUS)})"
            )
        g = GPUS[key]
    else:
        g = GPUS["rtx4090"]
        notes.append("no GPU here: planned for an RTX 4090 (--gpu NAME for another)")
    try:
        import flash_attn  # noqa: F401

        attention = "flash"
    except ImportError:
        attention = "sdpa"
    o = Options(
        method=cfg.method,
        precision=cfg.precision,
        micro_batch_tokens=cfg.micro_batch_tokens,
        tokens_per_step=cfg.tokens_per_step,
        seq_len=mean_doc_len,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
        kernels="torch" if cfg.kernels == "torch" else "triton",
        attention=attention,
        nproc=nproc,
        strategy=cfg.strategy,
        cpu_offload=cfg.cpu_offload,
        lora=LoraConfig(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets)),
    )
    shape = Shape.of(config, o.lora, name)
    tokens = examples * cfg.data.split[0] * mean_doc_len
    source = (
        f"{examples:,} examples x {cfg.data.split[0]:.0%} train x {mean_doc_len:.0f} tokens (sampled mean)"
    )
    plan = make_plan(shape, o, g, memory, tokens, source)
    plan.notes += notes
    text = format_plan(plan, hints(shape, o, g, plan))
    if cfg.model is not None and Path(cfg.model).is_dir():  # the run's own device, from its folder's files
        from fasttune.plan.host import host_plan_for_config

        text += "\n" + host_plan_for_config(cfg).describe()
    return text


def add_subparser(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU and time per epoch for a model, method, batch and GPU")
    p.add_argument("--model", required=True, help=f"a model folder or a shape: {', '.join(SHAPES)}")
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--gpu", default="rtx4090", help=f"one of {', '.join(GPUS)} (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (default: %(default)s)")
    p.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP: shards and optimizer on the host")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="all GPUs (default: %(default)s)")
    p.add_argument(
        "--micro-batch-tokens", type=int, help="per GPU per forward (default: tokens per step / nproc)"
    )
    p.add_argument("--seq-len", type=float, help="mean tokens per document (default: the data's, else 2048)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="for --data JSONL (default: %(default)s)")
    p.add_argument("--precision", choices=("bf16", "bf16-pure", "fp32"), default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--kernels", choices=("triton", "torch"), default="triton")
    p.add_argument(
        "--attention", choices=("sdpa", "flash"), default="sdpa", help="flash: flash-attn installed"
    )
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", nargs="+", default=list(LoraConfig().targets))
    p.add_argument("--dataset-tokens", type=float, help="tokens in the training data (one epoch)")
    p.add_argument("--data", type=Path, help="a prepared data folder (prepare.json) or a JSONL file")
    p.add_argument("--mfu", type=float, help="use this MFU (0-1) instead of a measured or assumed one")
    p.add_argument("--results", type=Path, default=RESULTS, help="where measured MFUs are looked for")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def command(args) -> int:
    config, name = resolve_model(args.model)
    gpu = resolve_gpu(args.gpu)
    if args.nproc < 1 or args.tokens_per_step < 1 or (args.mfu is not None and not 0 < args.mfu <= 1):
        raise FasttuneError("--nproc and --tokens-per-step must be >= 1, and --mfu in (0, 1]")
    if args.dataset_tokens is not None and args.data is not None:
        raise FasttuneError("give --dataset-tokens or --data, not both")
    micro = args.micro_batch_tokens or math.ceil(args.tokens_per_step / args.nproc)
    epoch_tokens, source, seq_len = args.dataset_tokens, "--dataset-tokens", args.seq_len
    if args.data is not None:
        folder = Path(args.model) if Path(args.model).is_dir() else None
        epoch_tokens, mean, source = data_tokens(args.data, folder, args.max_seq_len, micro)
        seq_len = seq_len or mean
    o = Options(
        method=args.method,
        precision=args.precision,
        micro_batch_tokens=micro,
        tokens_per_step=args.tokens_per_step,
        seq_len=seq_len or 2048.0,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        kernels=args.kernels,
        attention=args.attention,
        nproc=args.nproc,
        strategy=args.strategy,
        cpu_offload=args.cpu_offload,
        lora=LoraConfig(
            r=args.lora_r, alpha=2 * args.lora_r, dropout=args.lora_dropout, targets=tuple(args.lora_targets)
        ),
    )
    shape = Shape.of(config, o.lora, name)
    plan = make_plan(shape, o, gpu, None, epoch_tokens, source, args.mfu, args.results)
    if args.json:
        print(json.dumps(plan.to_json() | {"hints": hints(shape, o, gpu, plan)}, indent=2))
    else:
        print(format_plan(plan, hints(shape, o, gpu, plan)))
    return 0
