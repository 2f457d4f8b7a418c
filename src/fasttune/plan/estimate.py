"""`fasttune plan`: what fine-tuning a model needs, before anything is downloaded or run.

    fasttune plan --model qwen2.5-7b --method qlora --gpu rtx4090 --tokens-per-step 16384
    fasttune plan --model path/to/folder --method full --gpu rtx4090 --nproc 8 --strategy fsdp --json

Memory: see plan/memory.py, which holds the formulas.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fasttune.choices import METHODS
from fasttune.errors import FasttuneError
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
        lora=cfg.lora.to_lora_config(),
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
