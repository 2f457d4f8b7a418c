"""`fasttune profile`: where the time of a training step goes (how fast one op is: profiling/op.py).

    profile_run(cfg, steps=5, warmup=2)   # the loop under torch.profiler: trace.json + profile.json

Regions. The model and the loop mark their parts with `with region("attention"):` (`fasttune.attention`,
`.mlp`, `.norm`, `.head_loss`, `.embedding`, `.optimizer` in the trace). `region` returns a
`contextlib.nullcontext()` unless `REGIONS_ON` is set, which only `profile_run` does, for the length of
the run: a normal run pays one global read per region and torch.compile sees no profiler call.

Shares of the step. The step time is the sum of the profiler's `ProfilerStep#N` events over the recorded
steps (one per optimizer step: from one `on_step` to the next, so the loop's own work between steps is in
it). Each region's time has two parts:
  - forward: the region events' own durations (each region a disjoint interval of the main thread; the
    markers are placed so that none nests in another, and the analysis checks it);
  - backward: the autograd engine's `evaluate_function: <Node>` events whose node was created by an op
    inside the region (matched by the autograd sequence number and forward thread that the profiler
    records on both).
Where one counted interval lies inside another (activation checkpointing re-runs a block's forward inside
the backward of the block's last node), the time inside goes to the inner one and only the rest to the
outer: each instant is counted once, for the innermost region that holds it. On the CPU a region's time is
the wall time of its intervals; on CUDA it is the time of the GPU kernels launched from inside them.
"other" is the step time that no region holds: the RoPE tables, the loss scaling, gradient accumulation
into `.grad`, clipping, batching on the host, logging, and on a GPU the time it sits idle.

The top ops: on the CPU, aten ops (and autograd nodes, custom Functions) by self CPU time; on CUDA, GPU
kernels by their time. Each share is of the same step time, so the shares of the list add up to at most 1.
"""

from __future__ import annotations

import bisect
import copy
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fasttune import regions as marks
from fasttune.devices import resolve_device
from fasttune.errors import FasttuneError
from fasttune.regions import PREFIX, REGIONS

PERFETTO = "https://ui.perfetto.dev"
_BACKWARD = "autograd::engine::evaluate_function: "


# ----------------------------------------------------------------------------------------------------------
# profile_run: the training loop under torch.profiler


@dataclass
class RegionTime:
    name: str  # a REGIONS name or "other"
    share: float  # of the profiled steps' time
    ms_per_step: float
    backward_ms_per_step: float  # the part spent in the backward of the region's ops (0 for "other")


@dataclass
class OpTime:
    name: str  # an aten op / autograd node on the CPU, a GPU kernel on CUDA
    calls_per_step: float
    ms_per_step: float
    share: float  # of the profiled steps' time


@dataclass
class ProfileReport:
    device: str  # "cpu" or the GPU's name
    basis: str  # what the times are: "CPU time" or "GPU kernel time"
    steps: int  # optimizer steps recorded
    warmup: int  # steps run before the recorded ones
    step_ms: float  # mean wall time of a recorded step (under the profiler, which adds overhead)
    tokens_per_step: float
    top: list[OpTime]
    regions: list[RegionTime]  # REGIONS in order, then "other"; the shares sum to 1
    device_busy: float | None  # CUDA: GPU kernel time / step time (streams may overlap); None on the CPU
    trace: Path  # Chrome trace JSON: open it in https://ui.perfetto.dev
    json_path: Path  # profile.json: this report
    setup: dict = field(default_factory=dict)  # what ran: kernels, precision, tokens per micro-batch, ...
    warnings: list[str] = field(default_factory=list)

    @property
    def region_shares(self) -> dict[str, float]:
        return {r.name: r.share for r in self.regions}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trace"], d["json_path"] = str(self.trace), str(self.json_path)
        return d


class _WindowDone(Exception):
    """Raised from on_step after the last recorded step: the run ends there, with nothing saved."""


def profile_run(cfg, steps: int = 5, warmup: int = 2, out_dir=None, top: int = 15) -> ProfileReport:
    """Run `warmup` + `steps` optimizer steps of `cfg` (a RunConfig) under torch.profiler, record the last
    `steps`, write `trace.json` and `profile.json` to `out_dir` (default `<output_dir>/profile`) and return
    the report. The loop runs as `fasttune run` runs it, with its outputs in `<out_dir>/run`; evaluation,
    checkpoints, samples and early stopping are off, and the run stops after the last recorded step."""
    from fasttune.train import loop as train

    if steps < 1 or warmup < 1:
        raise FasttuneError(
            f"profile: steps >= 1 and warmup >= 1 needed (got steps={steps}, warmup={warmup}): the first "
            "step carries the set-up and one-time costs and is never recorded"
        )
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(out / "run")
    last = warmup + steps
    # One step more than recorded: the loop evaluates at its last step, which must not land in the window.
    cfg.max_steps = last + 1
    cfg.eval_every = cfg.save_every = cfg.max_steps + 1
    cfg.early_stopping, cfg.samples, cfg.tensorboard = None, 0, False
    device = resolve_device(cfg.device, "device")
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    trace = out / "trace.json"
    captured: dict = {}
    records: list[dict] = []

    def ready(prof) -> None:
        prof.export_chrome_trace(str(trace))
        captured["events"] = prof.events()

    # Steps 1 .. warmup-1 run without the profiler, step `warmup` with it warming up (its data dropped),
    # steps warmup+1 .. warmup+steps are recorded; ProfilerStep#k is the profiler's name for step k+1.
    schedule = torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1)
    marks.REGIONS_ON = True
    try:
        with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready) as prof:

            def on_step(step: int, record: dict) -> None:
                if cuda:
                    torch.cuda.synchronize()  # the step's kernels end inside its ProfilerStep interval
                if step > warmup:
                    records.append(record)
                prof.step()
                if step >= last:
                    raise _WindowDone

            try:
                train.run(cfg, on_step=on_step)
            except _WindowDone:
                pass
    finally:
        marks.REGIONS_ON = False
    if "events" not in captured:
        raise FasttuneError("profile: the run ended before any step was recorded")
    warnings = []
    if len(records) < steps:
        warnings.append(f"the run stopped after {len(records)} of the {steps} steps to record")
    result = analyze(captured["events"], device_time=cuda, top=top)
    warnings += result.pop("warnings")
    if cfg.compile and not result["regions"]["attention"][0]:
        warnings.append(
            "compile=true: torch.compile drops record_function inside compiled blocks, so attention, "
            "mlp and norm are not marked (their time is in 'other')"
        )
    n = max(1, result["steps"])
    total_ms = result["total_us"] / 1e3
    regions = []
    for name in (*REGIONS, "other"):
        us, bwd_us = result["regions"][name]
        regions.append(RegionTime(name, us / result["total_us"], us / 1e3 / n, bwd_us / 1e3 / n))
    report = ProfileReport(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        basis="GPU kernel time" if cuda else "CPU time",
        steps=result["steps"],
        warmup=warmup,
        step_ms=total_ms / n,
        tokens_per_step=sum(r["tokens"] for r in records) / max(1, len(records)),
        top=[
            OpTime(name, calls / n, us / 1e3 / n, us / result["total_us"])
            for name, calls, us in result["top"]
        ],
        regions=regions,
        device_busy=result["busy_us"] / result["total_us"] if cuda else None,
        trace=trace,
        json_path=out / "profile.json",
        setup={
            "kernels": cfg.kernels,
            "precision": cfg.precision,
            "method": cfg.method,
            "micro_batch_tokens": cfg.micro_batch_tokens,
            "tokens_per_step": cfg.tokens_per_step,
            "compile": cfg.compile,
            "activation_checkpointing": cfg.activation_checkpointing,
            "model": cfg.model or "built-in tiny Qwen2",
            "torch": torch.__version__,
        },
        warnings=warnings,
    )
    report.json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


class _Spans:
    """Labelled time intervals per thread, reduced to the outermost ones (an interval that starts inside
    an earlier kept one is dropped), with lookup of the interval holding a time."""

    def __init__(self, items):
        by_thread = defaultdict(list)
        for thread, start, end, label in items:
            by_thread[thread].append((start, end, label))
        self.kept: dict[int, list] = {}
        for thread, spans in by_thread.items():
            spans.sort(key=lambda s: (s[0], -s[1]))
            kept: list = []
            for s in spans:
                if not kept or s[0] >= kept[-1][1]:
                    kept.append(s)
            self.kept[thread] = kept
        self.starts = {t: [s[0] for s in k] for t, k in self.kept.items()}

    def find(self, thread, t):
        starts = self.starts.get(thread)
        if not starts:
            return None
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t < self.kept[thread][i][1]:
            return self.kept[thread][i][2]
        return None

    def __iter__(self):
        for spans in self.kept.values():
            yield from spans


def _innermost(items):
    """Labelled intervals (thread, start, end, label), nested on each thread, cut into disjoint pieces
    each labelled with the innermost interval that holds it."""
    by_thread = defaultdict(list)
    for thread, start, end, label in items:
        by_thread[thread].append((start, end, label))
    pieces = []
    for thread, spans in by_thread.items():
        stack: list = []  # (end, label) of the open intervals, innermost last
        cursor = 0.0
        for start, end, label in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][0] <= start:
                top_end, top = stack.pop()
                if cursor < top_end:
                    pieces.append((thread, cursor, top_end, top))
                cursor = top_end
            if stack:
                end = min(end, stack[-1][0])  # nested: never past the enclosing interval
                if cursor < start:
                    pieces.append((thread, cursor, start, stack[-1][1]))
            cursor = start
            stack.append((end, label))
        while stack:
            top_end, top = stack.pop()
            if cursor < top_end:
                pieces.append((thread, cursor, top_end, top))
            cursor = top_end
    return pieces


def analyze(events, device_time: bool = False, top: int = 15) -> dict:
    """The numbers of a report from the profiler's events (`prof.events()`): the step time, the top ops and
    the region times (microseconds), as the module docstring says. Raises if region markers nest."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    windows = sorted((e.time_range.start, e.time_range.end) for e in cpu if e.name.startswith("ProfilerStep"))
    if not windows:
        raise FasttuneError("profile: the trace has no ProfilerStep events")
    total_us = sum(e - s for s, e in windows)

    def clipped(s: float, e: float) -> float:
        return sum(max(0.0, min(e, we) - max(s, ws)) for ws, we in windows)

    marks = sorted(
        (e for e in cpu if e.is_user_annotation and e.name.startswith(PREFIX)),
        key=lambda e: (e.thread, e.time_range.start),
    )
    for a, b in zip(marks, marks[1:], strict=False):
        if a.thread == b.thread and b.time_range.start < a.time_range.end:
            raise RuntimeError(
                f"profile: region {b.name} starts inside {a.name}; fasttune's regions must not nest "
                "(a misplaced region() in the model or the loop)"
            )
    backward = [e for e in cpu if e.name.startswith(_BACKWARD)]
    in_backward = _Spans((e.thread, e.time_range.start, e.time_range.end, True) for e in backward)
    in_mark = _Spans((e.thread, e.time_range.start, e.time_range.end, e.name[len(PREFIX) :]) for e in marks)

    # (forward thread, sequence number) -> the region of the op that made that autograd node: the last
    # forward op to carry the number (ops that make no node only peek at the counter).
    made_by: dict[tuple, tuple] = {}
    for e in cpu:
        if e.sequence_nr < 0 or in_backward.find(e.thread, e.time_range.start):
            continue
        key, start = (e.thread, e.sequence_nr), e.time_range.start
        if key not in made_by or start >= made_by[key][0]:
            made_by[key] = (start, in_mark.find(e.thread, start))
    spans = [(e.thread, e.time_range.start, e.time_range.end, (e.name[len(PREFIX) :], False)) for e in marks]
    for e in backward:
        name = made_by.get((e.fwd_thread, e.sequence_nr), (0, None))[1] if e.sequence_nr >= 0 else None
        if name is not None:
            spans.append((e.thread, e.time_range.start, e.time_range.end, (name, True)))
    counted = _Spans(_innermost(spans))

    regions = {name: [0.0, 0.0] for name in (*REGIONS, "other")}  # [total us, of which backward]

    def add(label, us: float) -> None:
        name, is_backward = label
        r = regions.setdefault(name, [0.0, 0.0])
        r[0] += us
        r[1] += us if is_backward else 0.0

    busy_us = 0.0
    ops: dict[str, list] = defaultdict(lambda: [0, 0.0])
    if device_time:
        for e in cpu:
            if e.is_async or not e.kernels:
                continue
            label = counted.find(e.thread, e.time_range.start)
            if label is not None:
                add(label, sum(k.duration for k in e.kernels))
        for e in events:
            if e.device_type != DeviceType.CPU and not e.is_user_annotation:
                us = clipped(e.time_range.start, e.time_range.end)
                busy_us += us
                ops[e.name][0] += 1
                ops[e.name][1] += us
    else:
        for s, e, label in counted:
            add(label, clipped(s, e))
        for e in cpu:
            if e.is_user_annotation or e.name.startswith((_BACKWARD, "ProfilerStep")):
                continue
            ops[e.name][0] += 1
            ops[e.name][1] += e.self_cpu_time_total
    marked = sum(v[0] for k, v in regions.items() if k != "other")
    regions["other"] = [max(0.0, total_us - marked), 0.0]
    warnings = [f"no {PREFIX}{name} events in the trace" for name in REGIONS if not regions[name][0]]
    if marked > total_us * 1.001:  # e.g. kernels of two streams at once on a GPU
        warnings.append(f"the regions hold {marked / total_us:.1%} of the step: they overlap in time")
    ranked = sorted(((name, c, us) for name, (c, us) in ops.items()), key=lambda x: -x[2])
    return {
        "steps": len(windows),
        "total_us": total_us,
        "regions": {k: tuple(v) for k, v in regions.items()},
        "top": ranked[:top],
        "busy_us": busy_us,
        "warnings": warnings,
    }


def print_report(report: ProfileReport, file=None) -> None:
    """The report as a table."""
    file = file or sys.stdout
    s = report.setup
    tokens_s = report.tokens_per_step / (report.step_ms / 1e3) if report.step_ms else 0.0
    print(
        f"profiled {report.steps} step(s) after {report.warmup} warm-up step(s) on {report.device}: "
        f"{s.get('method')}, {s.get('precision')}, kernels={s.get('kernels')}, "
        f"{report.tokens_per_step:.0f} tokens per step",
        file=file,
    )
    busy = f"; GPU kernels take {report.device_busy:.1%} of it" if report.device_busy is not None else ""
    print(
        f"step time {report.step_ms:.2f} ms under the profiler ({tokens_s:,.0f} tokens/s; the profiler "
        f"adds overhead){busy}",
        file=file,
    )
    print(f"trace: {report.trace} (open it in {PERFETTO}); numbers: {report.json_path}", file=file)
    width = max([40] + [min(len(o.name), 72) for o in report.top])
    what = "GPU kernels by time" if report.device_busy is not None else "ops by self CPU time"
    print(f"\ntop {len(report.top)} {what:<{width - 6}} calls/step    ms/step   share", file=file)
    for o in report.top:
        name = o.name if len(o.name) <= 72 else o.name[:69] + "..."
        print(f"  {name:<{width}} {o.calls_per_step:10.1f} {o.ms_per_step:10.3f} {o.share:7.1%}", file=file)
    print(f"\nshare of the step ({report.basis}) {'ms/step':>17} {'backward':>10}   share", file=file)
    for r in report.regions:
        bwd = f"{r.backward_ms_per_step:10.3f}" if r.name != "other" else f"{'':10}"
        print(f"  {r.name:<33} {r.ms_per_step:10.3f} {bwd} {r.share:7.1%}", file=file)
    for w in report.warnings:
        print(f"warning: {w}", file=file)
