"""A battery of bad inputs and faults, each run through the CLI in a subprocess as a careless or hostile
user would run it: broken data files, impossible config values, poisoned model folders, corrupted or
edited checkpoints, output folders that are not ours, and a judge that redirects or floods.

Each case says what a user must see: a *clear error* (exit 2, exactly one `fasttune: error:` line on
stderr naming what is wrong, no traceback) or that the command *survived* (exit 0, with the bad part set
aside where the case says so). Every case also names the files that already existed and must come out
byte for byte as they went in: "data lost" is any of them changed or gone.

    python tests/battery.py            # prints the table; exit 1 if any row fails
    python -m pytest tests/test_battery.py   # the suite asserts every row
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"

SECRET = "sk-battery-secret-0123456789"  # the judge's API key: it must reach only the judge's origin


@dataclass
class Case:
    kind: str  # what is wrong, in a user's words
    argv: list[str]  # the fasttune command line
    expect: str  # "error" or "survived"
    names: tuple[str, ...] = ()  # what the error line must mention (a file, line, key or shape)
    protect: list[Path] = field(default_factory=list)  # files that must come out unchanged
    check: Callable[[], str | None] | None = None  # for "survived": returns a problem, or None
    timeout: float = 600


@dataclass
class Row:
    kind: str
    expect: str
    outcome: str  # "clear error", "survived", or what went wrong instead
    data_lost: str  # "none", or which protected file changed
    message: str  # the error line (or the survival check's note)

    @property
    def ok(self) -> bool:
        want = "clear error" if self.expect == "error" else "survived"
        return self.outcome == want and self.data_lost == "none"


# ---------------------------------------------------------------------------------------------------------
# Building the inputs


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(data)
    return path


def _good_lines(n: int = 40) -> list[str]:
    words = ["bread", "rain", "salt", "roads", "wells", "seeds", "rivers", "bells", "stones", "kettles"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        out.append(
            json.dumps(
                {"input": f"Share a proverb about {w} number {i}.", "output": f"{w.title()} {i} waits."}
            )
        )
    return out


def _model_folder(root: Path, texts: list[str], name: str = "model") -> Path:
    """A tiny Qwen2 folder: config.json, safetensors weights and a small BPE tokenizer (with Qwen2.5's chat
    template) trained on `texts`."""
    import torch
    import transformers

    from fasttune.models import builtin

    folder = root / name
    tok = builtin.train_tokenizer(texts, vocab_size=300)
    cfg = transformers.Qwen2Config(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


# ---------------------------------------------------------------------------------------------------------
# The cases


def data_cases(root: Path) -> list[Case]:
    d = root / "data"
    d.mkdir()
    cases = []

    def prep(name: str, lines, *extra, expect="error", names=(), check=None, fmt=None):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        f = _jsonl(d / f"{slug}.jsonl", lines)
        out = d / f"{slug}-out"
        argv = ["data", "prepare", str(f), "--out", str(out), *extra]
        return f, out, Case(name, argv, expect, names, [f], check)

    good = _good_lines()
    _, _, c = prep("invalid JSON on line 3", [*good[:2], "{not json", *good[2:]], names=(":3:",))
    cases.append(c)
    sep = json.dumps(
        {"input": "A line\u2028separator and a next\u0085line.", "output": "Kept whole."}, ensure_ascii=False
    )
    f, out, c = prep("raw U+2028 and U+0085 inside a string", [*good, sep], expect="survived")
    c.check = lambda out=out: (
        None
        if "Kept whole." in "".join((out / s).read_text() for s in ("train.jsonl", "val.jsonl", "test.jsonl"))
        else "the record was lost"
    )
    cases.append(c)
    _, out, c = prep(
        "a lone surrogate",
        [*good, '{"input": "bad \\ud800 text", "output": "x y"}'],
        "--skip-bad",
        expect="survived",
    )
    c.check = lambda out=out: None if "surrogate" in (out / "rejects.jsonl").read_text() else "not in rejects"
    cases.append(c)
    _, _, c = prep(
        "a lone surrogate without --skip-bad",
        [*good, '{"input": "bad \\ud800 text", "output": "x y"}'],
        names=(":41:",),
    )
    cases.append(c)
    _, _, c = prep("100,000 levels of nesting", [*good, "[" * 100_000 + "]" * 100_000], names=(":41:",))
    cases.append(c)
    _, _, c = prep(
        "an invalid UTF-8 byte",
        [*good[:5], b'{"input": "caf\xe9", "output": "x y"}', *good[5:]],
        names=(":6:",),
    )
    cases.append(c)
    big = json.dumps({"input": "x " * 2_000_000, "output": "y"})
    _, _, c = prep("a 4 MB line", [*good, big], "--max-seq-len", "256", names=(":41:",))
    cases.append(c)
    _, _, c = prep(
        "duplicate JSON keys",
        [*good, '{"input": "a b", "output": "c d", "output": "e f"}'],
        names=(":41:", "duplicate"),
    )
    cases.append(c)
    _, _, c = prep(
        "an output of only a zero-width space",
        [*good, json.dumps({"input": "a b", "output": "\u200b"})],
        names=(":41:",),
    )
    cases.append(c)
    _, _, c = prep("an empty file under --skip-bad", [], "--skip-bad", names=("an-empty-file",))
    cases.append(c)
    _, _, c = prep(
        "every line bad under --skip-bad", ["{", "[1, 2", "nope"], "--skip-bad", names=("every-line-bad",)
    )
    cases.append(c)
    cases.append(Case("a directory as the data file", ["data", "inspect", str(d)], "error", (str(d),)))
    missing = d / "missing.jsonl"
    cases.append(
        Case(
            "a data file that does not exist", ["data", "inspect", str(missing)], "error", ("missing.jsonl",)
        )
    )
    return cases


def config_cases(root: Path, model: Path, data: Path) -> list[Case]:
    base = [f"model={model}", f"data.files=[{data}]", f"output_dir={root / 'cfg-out'}", "device=cpu"]
    cases = []
    for kind, override, key in (
        ("lr = inf", "lr=.inf", "lr"),
        ("lr = 1e308", "lr=1e308", "lr"),
        ("max_steps = 1e29", "max_steps=1e29", "max_steps"),
        ("micro_batch_tokens = 1e16", "micro_batch_tokens=1e16", "micro_batch_tokens"),
        ("epochs = 1e300", "epochs=1e300", "epochs"),
        ("an unknown key", "learning_rate=1e-4", "learning_rate"),
    ):
        cases.append(Case(f"config: {kind}", ["run", *base, override], "error", (key,)))
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("optim:\n  lr: [1e-4\n")
    cases.append(
        Case(
            "config: a YAML file that does not parse",
            ["run", str(bad_yaml)],
            "error",
            ("bad.yaml",),
            [bad_yaml],
        )
    )
    cases.append(
        Case(
            "config: a config file that does not exist",
            ["run", str(root / "nope.yaml")],
            "error",
            ("nope.yaml",),
        )
    )
    return cases


def model_cases(root: Path, model: Path) -> list[Case]:
    cases = []

    def variant(name: str) -> Path:
        m = root / "models" / name.replace(" ", "-")
        shutil.copytree(model, m, symlinks=True)
        return m

    m = variant("no config")
    (m / "config.json").unlink()
    cases.append(Case("model: no config.json", ["info", str(m)], "error", ("config.json",)))
    m = variant("layers 1e9")
    _edit_json(m / "config.json", num_hidden_layers=1_000_000_000)
    cases.append(
        Case("model: num_hidden_layers = 1e9", ["info", str(m)], "error", ("num_hidden_layers",), timeout=60)
    )
    m = variant("hidden not divisible")
    _edit_json(m / "config.json", hidden_size=30)
    cases.append(
        Case("model: hidden_size not divisible by the heads", ["info", str(m)], "error", ("hidden_size",))
    )
    m = variant("config not json")
    (m / "config.json").write_text("{ nope")
    cases.append(Case("model: config.json that is not JSON", ["info", str(m)], "error", ("config.json",)))
    m = variant("dev zero")
    (m / "tokenizer_config.json").unlink()
    (m / "tokenizer_config.json").symlink_to("/dev/zero")
    cases.append(
        Case(
            "model: tokenizer_config.json links to /dev/zero",
            ["info", str(m)],
            "error",
            ("tokenizer_config.json",),
            timeout=60,
        )
    )
    m = variant("fifo")
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    cases.append(
        Case("model: config.json is a FIFO", ["info", str(m)], "error", ("config.json",), timeout=60)
    )
    m = variant("truncated")
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cases.append(
        Case(
            "model: truncated safetensors",
            ["generate", "--model", str(m), "hi"],
            "error",
            ("model.safetensors",),
        )
    )
    m = variant("pickle")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    cases.append(
        Case(
            "model: only a pickle checkpoint",
            ["generate", "--model", str(m), "hi"],
            "error",
            ("pytorch_model.bin",),
        )
    )
    m = variant("range template")
    (m / "chat_template.jinja").write_text("{% for i in range(100000000) %}x{% endfor %}")
    cases.append(
        Case("model: a template that loops 1e8 times", ["info", str(m)], "error", ("template",), timeout=120)
    )
    return cases


def _tiny_run_overrides(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model={model}",
        f"data.files=[{data}]",
        f"output_dir={out}",
        "precision=fp32",
        "device=cpu",
        "micro_batch_tokens=512",
        "max_seq_len=256",
        "data.system_prompt=none",
        "data.stratify=null",
        "lr=1e-3",
        "max_steps=4",
        "eval_every=2",
        "save_every=2",
        "samples=0",
        "eval_examples=0",
    ]


def _trained_run(root: Path, model: Path, data: Path) -> Path:
    """A finished tiny run with checkpoints at steps 2 and 4 (trained here, in this process)."""
    from fasttune.train import loop as train
    from fasttune.train.config import load_config

    out = root / "run"
    train.run(load_config(None, _tiny_run_overrides(model, data, out)))
    return out


def run_cases(root: Path, model: Path, data: Path, run: Path) -> list[Case]:
    cases = []

    def copy(name: str) -> tuple[Path, list[str], Path]:
        out = root / "runs" / name
        shutil.copytree(run, out)
        shutil.rmtree(out / "model")  # an interrupted run: checkpoints, no final model
        ckpt = out / "checkpoints" / "step-00000004"
        return out, ["run", *_tiny_run_overrides(model, data, out), "--resume"], ckpt

    def state_file(ckpt: Path) -> Path:
        return sorted((ckpt / "state").glob("*.safetensors"))[0]

    out, argv, ckpt = copy("flipped")
    f = state_file(ckpt)
    raw = bytearray(f.read_bytes())
    for i in range(len(raw) - 1000, len(raw)):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
    cases.append(Case("checkpoint: 1,000 flipped bytes in a state file", argv, "error", (f.name,), [out]))
    out, argv, ckpt = copy("truncated")
    f = state_file(ckpt)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    cases.append(Case("checkpoint: a truncated state file", argv, "error", (f.name,), [out]))
    out, argv, ckpt = copy("edited-step")
    _edit_json(ckpt / "meta.json", step=1)
    cases.append(Case("checkpoint: meta.json's step edited", argv, "error", ("meta.json",), [out]))
    out, argv, ckpt = copy("no-rng")
    rng = sorted(ckpt.glob("rng-*.safetensors"))[0]
    rng.unlink()
    cases.append(Case("checkpoint: a missing RNG file", argv, "error", (rng.name,), [out]))
    out, argv, ckpt = copy("bogus-sampler")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sampler"] = {"nonsense": 1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    cases.append(Case("checkpoint: a bogus sampler entry", argv, "error", ("sampler",), [out]))
    out, argv, _ = copy("changed-lr")
    cases.append(
        Case(
            "resume: with a changed learning rate",
            [*argv[:-1], "lr=5e-4", "--resume"],
            "error",
            ("lr",),
            [out],
        )
    )
    # output folders that are not (or no longer) free for a new run
    other = root / "someone-else"
    other.mkdir()
    (other / "notes.txt").write_text("my thesis")
    cases.append(
        Case(
            "run: into a non-empty folder that is not a run",
            ["run", *_tiny_run_overrides(model, data, other)],
            "error",
            ("someone-else",),
            [other],
        )
    )
    cases.append(
        Case(
            "run: a second run into a finished run's folder",
            ["run", *_tiny_run_overrides(model, data, run)],
            "error",
            ("--resume",),
            [run],
        )
    )
    return cases


class _Server:
    """A local HTTP server on a port the OS picks; `answer(handler)` scripts each POST. It records the
    requests it gets (path and Authorization header), and stops with the battery."""

    def __init__(self, answer):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen.append((self.path, self.headers.get("Authorization")))
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should past its cap or deadline

            def log_message(self, *args):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v1"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _reply(handler, code: int, body: bytes, headers: dict | None = None) -> None:
    handler.send_response(code)
    for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def judge_cases(root: Path, run: Path, servers: list) -> list[Case]:
    """`fasttune eval` of a finished run with a judge that misbehaves: the evaluation survives, the judge's
    answers are recorded as failures, and the key never leaves the judge's origin."""
    rubric = root / "rubric.txt"
    rubric.write_text("Request: {instruction}\nReply: {response}\nEnd with Score: N.\n")
    elsewhere = _Server(lambda h: _reply(h, 200, b'{"choices": [{"message": {"content": "Score: 5"}}]}'))
    redirect = _Server(lambda h: _reply(h, 302, b"", {"Location": elsewhere.url + "/chat/completions"}))
    flood = _Server(lambda h: _reply(h, 200, b"x" * (64 << 20)))
    servers += [elsewhere, redirect, flood]
    cases = []
    for kind, server in (("redirects to another port", redirect), ("answers with a 64 MB body", flood)):
        report = root / f"eval-{server.srv.server_address[1]}.json"
        argv = [
            "eval",
            "--run",
            str(run),
            "--out",
            str(report),
            "--max-examples",
            "2",
            "--max-new-tokens",
            "4",
            "--judge-url",
            server.url,
            "--judge-model",
            "m",
            "--rubric",
            str(rubric),
            "--judge-api-key-env",
            "BATTERY_KEY",
            "--judge-timeout",
            "5",
        ]

        def check(report=report):
            if elsewhere.seen:
                return f"the other origin got {len(elsewhere.seen)} request(s)"
            cache = Path(str(report) + ".judge.jsonl")
            if not cache.is_file():
                return "no judge cache"
            rows = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()]
            if not rows or any(r.get("status") == "ok" for r in rows):
                return "a score was recorded from a bad reply"
            written = cache.read_text() + (report.read_text() if report.is_file() else "")
            return "the API key was written to disk" if SECRET in written else None

        cases.append(Case(f"judge: {kind}", argv, "survived", check=check, protect=[run / "model"]))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Running


def _digests(paths: list[Path]) -> dict[Path, str | None]:
    out = {}
    for p in paths:
        if p.is_file():
            out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():  # a run folder: every file but the lock, which holds the pid of its last taker
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name != ".fasttune.lock"):
                h.update(str(f.relative_to(p)).encode() + b"\0" + f.read_bytes())
            out[p] = h.hexdigest()
        else:
            out[p] = None
    return out


def run_case(case: Case, cwd: Path) -> Row:
    before = _digests(case.protect)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BATTERY_KEY": SECRET}
    cmd = [sys.executable, "-m", "fasttune.cli", *case.argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=case.timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return Row(case.kind, case.expect, f"hung (over {case.timeout:.0f} s)", _lost(case, before), "")
    errors = [x for x in p.stderr.splitlines() if x.startswith("fasttune: ")]
    message = errors[-1] if errors else (p.stderr.strip().splitlines() or [""])[-1]
    if "Traceback" in p.stderr:
        outcome = f"traceback (exit {p.returncode})"
    elif case.expect == "error":
        if p.returncode != 2 or len(errors) != 1 or not errors[0].startswith("fasttune: error: "):
            outcome = f"exit {p.returncode}, {len(errors)} error line(s)"
        elif missing := [n for n in case.names if n not in errors[0]]:
            outcome = f"unclear: does not name {missing}"
        else:
            outcome = "clear error"
    elif p.returncode != 0:
        outcome = f"exit {p.returncode}"
    else:
        problem = case.check() if case.check else None
        outcome, message = (
            ("survived", message) if problem is None else (f"survived wrongly: {problem}", message)
        )
    return Row(case.kind, case.expect, outcome, _lost(case, before), message[:160])


def _lost(case: Case, before: dict) -> str:
    after = _digests(case.protect)
    changed = [p.name for p in case.protect if before[p] != after[p]]
    return "none" if not changed else "changed: " + ", ".join(changed)


def build_cases(root: Path, servers: list) -> list[Case]:
    lines = _good_lines(60)
    data = _jsonl(root / "train.jsonl", lines)
    model = _model_folder(root, [v for x in lines for v in json.loads(x).values()])
    run = _trained_run(root, model, data)
    return [
        *data_cases(root),
        *config_cases(root, model, data),
        *model_cases(root, model),
        *run_cases(root, model, data, run),
        *judge_cases(root, run, servers),
    ]


def table(rows: list[Row]) -> str:
    w = max(len(r.kind) for r in rows)
    lines = [f"{'kind':{w}s}  {'expected':8s}  {'outcome':28s}  {'data lost':9s}  message", "-" * (w + 70)]
    for r in rows:
        mark = "" if r.ok else "  <-- FAIL"
        lines.append(f"{r.kind:{w}s}  {r.expect:8s}  {r.outcome:28s}  {r.data_lost:9s}  {r.message}{mark}")
    return "\n".join(lines)


def run_battery(root: Path, workers: int = 2) -> list[Row]:
    servers: list[_Server] = []
    try:
        cases = build_cases(root, servers)
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda c: run_case(c, root), cases))
    finally:
        for s in servers:
            s.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_battery(Path(tmp))
    print(table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} cases as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
