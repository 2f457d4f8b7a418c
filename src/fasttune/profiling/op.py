"""`fasttune profile --op NAME`: one op, Triton against its PyTorch reference, across shapes.

    profile_op("rms_norm")    # forward and forward + backward median ms of both, at a default set of shapes

The timing itself is `fasttune.ops.timing.time_op`, the harness the op benchmarks (benchmarks/ops/) use
too; this module chooses the shapes, builds each op's inputs and puts the rows together.
"""

from __future__ import annotations

import difflib
import os
import sys

import torch

from fasttune.choices import OPS
from fasttune.errors import FasttuneError
from fasttune.ops.timing import time_op

# What a shape tuple of each op means, and the defaults: tiny on the CPU (Triton's interpreter runs a
# program at a time in Python), Qwen2.5-0.5B's sizes at 4k, 16k and 32k tokens on a GPU.
SHAPE_DIMS = {
    "rms_norm": ("tokens", "H"),
    "rope": ("tokens", "n_q", "n_kv", "hd"),
    "swiglu": ("tokens", "I"),
    "linear_cross_entropy": ("tokens", "H", "V"),
    "lora_linear": ("tokens", "in", "out", "r"),
}
CPU_SHAPES = {
    "rms_norm": [(16, 64), (64, 96)],
    "rope": [(32, 6, 2, 16), (64, 6, 2, 16)],
    "swiglu": [(16, 64), (64, 96)],
    "linear_cross_entropy": [(16, 32, 500), (32, 32, 1000)],
    "lora_linear": [(8, 48, 80, 16), (16, 48, 80, 16)],
}
_TOKENS = (4096, 16384, 32768)
GPU_SHAPES = {
    "rms_norm": [(t, 896) for t in _TOKENS],
    "rope": [(t, 14, 2, 64) for t in _TOKENS],
    "swiglu": [(t, 4864) for t in _TOKENS],
    "linear_cross_entropy": [(t, 896, 151_936) for t in _TOKENS],
    "lora_linear": [(t, 896, 4864, 16) for t in _TOKENS],
}
INTERPRETER_NOTE = (
    "CPU: the Triton op ran in Triton's interpreter (Python, one program at a time) and the reference in "
    "PyTorch on the CPU; these times check that the op runs and say nothing about its speed on a GPU"
)


def check_op(name: str) -> None:
    if name not in OPS:
        close = difflib.get_close_matches(name, OPS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FasttuneError(f"profile --op: unknown op '{name}'{hint} (ops: {', '.join(OPS)})")


def _load_op(name: str, device: torch.device):
    """The op's module, with Triton's interpreter chosen first when the op is to run on the CPU."""
    import importlib

    module_name = f"fasttune.ops.{name}"
    if device.type == "cpu" and module_name not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(module_name)
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
            raise FasttuneError(
                f"profile --op {name} on the CPU needs Triton's interpreter, but this process loaded the "
                "kernels for a GPU: set TRITON_INTERPRET=1 before anything imports fasttune.ops"
            )
    return module


def _inputs(name: str, shape: tuple, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """(triton_fn, torch_fn, inputs, note) for one shape; inputs to differentiate require grad."""
    mod = sys.modules[f"fasttune.ops.{name}"]

    def randn(*size, dt=dtype, scale=1.0, grad=True):
        t = (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    note = ""
    if name == "rms_norm":
        T, H = shape
        inputs = [randn(T, H), (1 + 0.2 * torch.randn(H, generator=gen)).to(device, dtype).requires_grad_()]
        fns = (lambda x, w: mod.rms_norm(x, w, 1e-6), lambda x, w: mod.rms_norm_ref(x, w, 1e-6))
    elif name == "rope":
        T, n_q, n_kv, hd = shape
        positions = (torch.arange(T) % 58)[None].to(device)  # packed documents of 58 tokens
        inv_freq = (1.0 / 1e6 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)).to(device)
        inputs = [randn(1, T, n_q, hd), randn(1, T, n_kv, hd), positions, inv_freq]
        # The op rotates in place, which autograd refuses on leaves: it gets clones (timed with it).
        fns = (lambda q, k, p, f: mod.rope(q.clone(), k.clone(), p, f), mod.rope_ref)
        note = "the Triton time includes cloning q and k (the op works in place)"
    elif name == "swiglu":
        T, I = shape
        inputs = [randn(T, I), randn(T, I)]
        fns = (mod.swiglu, mod.swiglu_ref)
    elif name == "linear_cross_entropy":
        T, H, V = shape
        targets = torch.randint(0, V, (T,), generator=gen)
        targets[torch.rand(T, generator=gen) < 0.1] = -100
        inputs = [randn(T, H), randn(V, H, scale=3 * H**-0.5), targets.to(device)]
        fns = (
            lambda h, w, t: mod.linear_cross_entropy(h, w, t)[0],
            lambda h, w, t: mod.linear_cross_entropy_ref(h, w, t)[0],
        )
    else:
        T, d_in, d_out, r = shape
        weight = randn(d_out, d_in, scale=d_in**-0.5, grad=False)
        a = randn(r, d_in, dt=torch.float32, scale=d_in**-0.5)
        b = randn(d_out, r, dt=torch.float32, scale=r**-0.5)
        inputs = [randn(T, d_in), weight, a, b]
        fns = (
            lambda x, w, a, b: mod.lora_linear(x, w, None, a, b, 2.0),
            lambda x, w, a, b: mod.lora_linear_ref(x, w, None, a, b, 2.0),
        )
    return fns[0], fns[1], inputs, note


def profile_op(name: str, shapes=None, dtype=None, device=None, reps: int = 5) -> list[dict]:
    """Forward and forward + backward median milliseconds of the Triton op `name` and of its PyTorch
    reference at each shape (a tuple per SHAPE_DIMS[name]; default CPU_SHAPES or GPU_SHAPES). On CUDA the
    medians come from `triton.testing.do_bench`; on the CPU from `reps` runs timed with perf_counter, the
    Triton op through the interpreter (see INTERPRETER_NOTE). One dict per (shape, implementation)."""
    check_op(name)
    from fasttune.models.weights import parse_dtype

    cuda_ok = torch.cuda.is_available()
    try:
        device = torch.device(device if device is not None else ("cuda" if cuda_ok else "cpu"))
    except RuntimeError:
        raise FasttuneError(f"profile --op: unknown device {device!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not cuda_ok):
        raise FasttuneError(
            f"profile --op: no {device} device here; use cpu" + (" or cuda" if cuda_ok else "")
        )
    cuda = device.type == "cuda"
    try:
        dtype = parse_dtype(dtype, "profile --op dtype") or (torch.bfloat16 if cuda else torch.float32)
    except ValueError as e:
        raise FasttuneError(str(e)) from None
    dims = SHAPE_DIMS[name]
    shapes = [tuple(int(d) for d in s) for s in (shapes or (GPU_SHAPES if cuda else CPU_SHAPES)[name])]
    for s in shapes:
        if len(s) != len(dims) or min(s) < 1:
            raise FasttuneError(
                f"profile --op {name}: a shape is {' x '.join(dims)} (positive), got {'x'.join(map(str, s))}"
            )
    if reps < 1:
        raise FasttuneError(f"profile --op: reps must be >= 1, got {reps}")
    _load_op(name, device)
    gen = torch.Generator().manual_seed(0)
    timer = "triton.testing.do_bench median" if cuda else f"perf_counter median of {reps}"
    rows = []
    for shape in shapes:
        triton_fn, torch_fn, inputs, note = _inputs(name, shape, dtype, device, gen)
        pair = {}
        for impl, fn in (("triton", triton_fn), ("torch", torch_fn)):
            row = {
                "op": name,
                "shape": "x".join(map(str, shape)),
                "dims": " x ".join(dims),
                "impl": impl,
                "dtype": str(dtype).removeprefix("torch."),
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "interpreter": impl == "triton" and not cuda,
                "timer": timer,
                "forward_ms": None,
                "forward_backward_ms": None,
            }
            if note and impl == "triton":
                row["note"] = note
            try:
                times = time_op(fn, inputs, cuda, reps)
                row["forward_ms"], row["forward_backward_ms"] = (
                    times["forward_ms"],
                    times["forward_backward_ms"],
                )
            except torch.cuda.OutOfMemoryError as e:  # e.g. the reference's [T, V] logits on a small GPU
                row["error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                torch.cuda.empty_cache()
            pair[impl] = row
            rows.append(row)
        t, r = pair["triton"]["forward_backward_ms"], pair["torch"]["forward_backward_ms"]
        if cuda and t and r:
            pair["triton"]["speedup_vs_torch"] = round(r / t, 3)
    return rows


def print_op_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    if not rows:
        return
    first = rows[0]
    where = " (the Triton op through its interpreter)" if any(r["interpreter"] for r in rows) else ""
    print(
        f"{first['op']} ({first['dims']}), {first['dtype']} on {first['device']}{where}, {first['timer']}",
        file=file,
    )
    width = max(len(r["shape"]) for r in rows) + 2
    print(f"  {'shape':<{width}}{'impl':<8}{'forward ms':>12}{'fwd+bwd ms':>12}", file=file)
    for r in rows:
        f, b = r["forward_ms"], r["forward_backward_ms"]
        cells = f"{f:12.3f}{b:12.3f}" if f is not None else f"  {r.get('error', 'failed')}"
        extra = f"   {r['speedup_vs_torch']:.2f}x faster than torch" if r.get("speedup_vs_torch") else ""
        print(f"  {r['shape']:<{width}}{r['impl']:<8}{cells}{extra}", file=file)
    notes = {r["note"] for r in rows if r.get("note")}
    if any(r["interpreter"] for r in rows):
        notes.add(INTERPRETER_NOTE)
    for n in sorted(notes):
        print(f"note: {n}", file=file)
