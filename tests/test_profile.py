"""`fasttune profile`: a tiny CPU run under torch.profiler (trace, top ops, shares of the step, profile.json,
the command), the region markers (off outside profiling, never nested, backward attributed), and
`profile_op` on every op through Triton's interpreter."""

import contextlib
import json
import math

import pytest
import torch

import fasttune.profiling.op as prof_op
import fasttune.profiling.profile as prof
from fasttune import regions as marks
from fasttune.cli.main import main
from fasttune.errors import FasttuneError
from fasttune.models.weights import load_model
from fasttune.train import loop as train
from fasttune.train.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MARKED = ("attention", "mlp", "norm", "head_loss", "optimizer")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads make tiny matmuls wait on each
    other and the run takes several times as long; the shares are tested, not the times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(setup, out):
    return [
        f"model={setup / 'model'}",
        f"data.files=[{setup / 'data.jsonl'}]",
        f"output_dir={out}",
        "precision=fp32",
        "device=cpu",
        "micro_batch_tokens=256",
        "max_seq_len=256",
        "data.system_prompt=none",
    ]


@pytest.fixture(scope="module")
def profiled(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiled")
    cfg = load_config(None, overrides(setup, out / "run"))
    report = prof.profile_run(cfg, steps=3, warmup=2, out_dir=out, top=8)
    return report, out


def test_trace_is_a_chrome_trace_that_perfetto_reads(profiled):
    report, out = profiled
    assert report.trace == out / "trace.json"
    trace = json.loads(report.trace.read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {f"fasttune.{r}" for r in MARKED} <= names
    assert sum(n.startswith("ProfilerStep#") for n in names) == 3  # only the recorded steps
    assert not (out / "run" / "checkpoints").exists()  # the run stopped after the window, saving nothing


def test_region_shares_cover_the_step(profiled):
    report, _ = profiled
    assert report.steps == 3 and report.warmup == 2 and report.basis == "CPU time"
    shares = report.region_shares
    assert list(shares) == [*marks.REGIONS, "other"]
    assert all(0 <= s <= 1 for s in shares.values()), shares
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9)
    for name in MARKED:
        assert shares[name] > 0, name
    assert math.isclose(sum(r.ms_per_step for r in report.regions), report.step_ms, rel_tol=1e-9)
    by_name = {r.name: r for r in report.regions}
    for name in ("attention", "mlp", "norm", "head_loss"):  # the backward of their ops is theirs too
        assert 0 < by_name[name].backward_ms_per_step < by_name[name].ms_per_step, name
    assert by_name["optimizer"].backward_ms_per_step == 0
    assert report.tokens_per_step > 0 and report.device_busy is None and not report.warnings


def test_top_ops_are_sorted_and_their_shares_consistent(profiled):
    report, _ = profiled
    assert 0 < len(report.top) <= 8
    ms = [o.ms_per_step for o in report.top]
    assert ms == sorted(ms, reverse=True)
    for o in report.top:
        assert 0 < o.share <= 1 and o.calls_per_step > 0
        assert math.isclose(o.share, o.ms_per_step / report.step_ms, rel_tol=1e-9)
        assert not o.name.startswith(("fasttune.", "ProfilerStep"))
    assert sum(o.share for o in report.top) <= 1
    assert any(o.name in ("aten::mm", "aten::addmm") for o in report.top)


def test_profile_json_has_the_same_numbers(profiled):
    report, out = profiled
    assert report.json_path == out / "profile.json"
    assert json.loads(report.json_path.read_text()) == json.loads(json.dumps(report.to_dict()))
    saved = json.loads(report.json_path.read_text())
    assert {r["name"]: r["share"] for r in saved["regions"]} == report.region_shares
    assert [o["name"] for o in saved["top"]] == [o.name for o in report.top]


def test_print_report_is_a_table(profiled, capsys):
    report, _ = profiled
    prof.print_report(report)
    out = capsys.readouterr().out
    assert "ui.perfetto.dev" in out and "top 8 ops by self CPU time" in out
    for name in (*MARKED, "other"):
        assert f"  {name} " in out


def test_regions_are_off_outside_profiling(setup, profiled, tmp_path, monkeypatch):
    assert marks.REGIONS_ON is False
    assert isinstance(marks.region("attention"), contextlib.nullcontext)
    model = load_model(setup / "model", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        model.loss(ids, ids).backward()
    assert not [e.name for e in p.events() if e.name.startswith("fasttune.")]

    def boom(cfg, on_step=None):  # a run that fails: the switch is still put back
        assert marks.REGIONS_ON is True
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "run", boom)
    cfg = load_config(None, overrides(setup, tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        prof.profile_run(cfg, steps=1, warmup=1, out_dir=tmp_path)
    assert marks.REGIONS_ON is False


def _profile_toy(body):
    """Run `body` once as a recorded ProfilerStep with the regions on; the profiler's events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        old, marks.REGIONS_ON = marks.REGIONS_ON, True
        try:
            with torch.profiler.record_function("ProfilerStep#0"):
                body()
        finally:
            marks.REGIONS_ON = old
    return p.events()


def test_backward_is_attributed_by_autograd_sequence_number():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)

    def body():
        with marks.region("mlp"):
            y = torch.relu(lin(x))
        scaled = y * 2.0  # unmarked: its backward is "other"
        with marks.region("head_loss"):
            loss = scaled.square().mean()
        loss.backward()

    result = prof.analyze(_profile_toy(body))
    regions = result["regions"]
    assert regions["mlp"][1] > 0 and regions["head_loss"][1] > 0  # backward time found for both
    assert regions["attention"] == (0.0, 0.0)
    assert math.isclose(sum(v[0] for v in regions.values()), result["total_us"], rel_tol=1e-9)
    assert result["steps"] == 1


def test_each_instant_counts_once_for_the_innermost_interval():
    # thread 1: a backward node [0, 10) holding a recomputed forward region [2, 5); thread 2: two siblings
    spans = [(1, 0.0, 10.0, "bwd"), (1, 2.0, 5.0, "fwd"), (2, 0.0, 4.0, "a"), (2, 4.0, 6.0, "b")]
    pieces = sorted(prof._innermost(spans))
    assert pieces == [
        (1, 0.0, 2.0, "bwd"),
        (1, 2.0, 5.0, "fwd"),
        (1, 5.0, 10.0, "bwd"),
        (2, 0.0, 4.0, "a"),
        (2, 4.0, 6.0, "b"),
    ]


def test_recomputed_regions_are_not_counted_twice():
    lin1, lin2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)

    def block(x):
        with marks.region("attention"):
            a = lin1(x)
        with marks.region("mlp"):
            return a + torch.relu(lin2(a))

    def body():
        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        with marks.region("head_loss"):
            loss = y.square().mean()
        loss.backward()

    events = _profile_toy(body)
    assert sum(e.name == "fasttune.attention" for e in events) == 2  # forward, and again in the backward
    result = prof.analyze(events)
    marked = sum(v[0] for name, v in result["regions"].items() if name != "other")
    assert 0 < marked <= result["total_us"]
    assert result["regions"]["attention"][0] > 0 and result["regions"]["mlp"][1] > 0


def test_nested_regions_are_refused():
    def body():
        with marks.region("mlp"), marks.region("norm"):
            torch.ones(3).sum()

    with pytest.raises(RuntimeError, match="fasttune.norm starts inside fasttune.mlp"):
        prof.analyze(_profile_toy(body))


def test_the_command_prints_the_table(setup, tmp_path, capsys):
    argv = ["profile", *overrides(setup, tmp_path / "run"), "--steps", "2", "--warmup", "1", "--top", "5"]
    assert main([*argv, "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "profiled 2 step(s) after 1 warm-up step(s) on cpu" in out
    assert "top 5 ops by self CPU time" in out and "share of the step (CPU time)" in out
    assert (tmp_path / "p" / "trace.json").is_file() and (tmp_path / "p" / "profile.json").is_file()
    # errors exit 2 with the reason, as the other commands do
    assert main(["profile", *overrides(setup, tmp_path / "run"), "--steps", "0"]) == 2
    assert "steps >= 1 and warmup >= 1" in capsys.readouterr().err
    assert main(["profile", "--op", "rmsnorm"]) == 2
    assert "unknown op 'rmsnorm'; did you mean 'rms_norm'?" in capsys.readouterr().err


def test_the_command_times_an_op(capsys):
    assert main(["profile", "--op", "swiglu", "--shape", "8x48", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "swiglu (tokens x I), float32 on cpu" in out
    assert "8x48" in out and "triton" in out and "torch" in out and "interpreter" in out


@pytest.mark.parametrize("op", prof_op.OPS)
def test_profile_op_times_both_implementations(op):
    shape = prof_op.CPU_SHAPES[op][0]
    rows = prof_op.profile_op(op, shapes=[shape], device="cpu", reps=2)
    assert [r["impl"] for r in rows] == ["triton", "torch"]
    for r in rows:
        assert r["op"] == op and r["shape"] == "x".join(map(str, shape)) and r["dtype"] == "float32"
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        assert r["interpreter"] == (r["impl"] == "triton")
        assert "speedup_vs_torch" not in r  # no speed is claimed from interpreter timings


def test_profile_op_refuses_unknown_ops_and_bad_shapes():
    with pytest.raises(FasttuneError, match=r"unknown op 'swish'.*ops: rms_norm, rope, swiglu"):
        prof_op.profile_op("swish")
    with pytest.raises(FasttuneError, match=r"a shape is tokens x H \(positive\), got 8x64x2"):
        prof_op.profile_op("rms_norm", shapes=[(8, 64, 2)], device="cpu")
