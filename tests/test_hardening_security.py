"""Issue 14, items 1-3: the judge never follows a redirect (nor sends its key to another origin), caps a
reply's size and bounds a request's whole time; reading a model folder is bounded (file sizes, regular
files only, config fields within sane ranges) and a chat template's runtime errors are one clear error."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import fasttune
from fasttune.errors import CheckpointError, ConfigError, TokenizerError
from fasttune.eval.judge import Item, JudgeCache, JudgeClient, load_template, score_items
from fasttune.models.model import ModelConfig
from fasttune.models.tokenizer import Tokenizer, builtin_tokenizer, write_builtin_tokenizer
from helpers import write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ----------------------------------------------------------------------------------------------------------
# Local HTTP servers (the style of tests/test_judge.py): each handler is scripted by the test.

REPLY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Score: 5"}}]}).encode()


class _Handler(BaseHTTPRequestHandler):
    def _record(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        with self.server.lock:
            self.server.requests.append({"method": self.command, "auth": self.headers.get("Authorization")})
            self.server.paths.append(self.path)

    def do_GET(self):  # noqa: N802 (http.server's naming): a followed 301/302 arrives as a GET
        self._record()
        self.server.script(self)

    def do_POST(self):  # noqa: N802
        self._record()
        self.server.script(self)

    def log_message(self, *args):
        pass


def _answer(handler, code=200, body=REPLY, headers=None, length=True):
    try:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        if length:
            handler.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up


@pytest.fixture
def servers():
    made = []

    def make(script=lambda h: _answer(h)):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads, srv.block_on_close = True, False
        srv.requests, srv.paths, srv.lock, srv.script = [], [], threading.Lock(), script
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.shutdown()
        srv.server_close()


def _score_one(client, tmp_path) -> dict:
    return score_items(client, [Item("ask", "reply")], load_template(None), JudgeCache(tmp_path / "c.jsonl"))[
        0
    ]


# ----------------------------------------------------------------------------------------------------------
# Item 1: redirects


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_item01_redirect_is_an_error_naming_the_target_and_the_key_stays_home(
    servers, tmp_path, monkeypatch, code
):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    elsewhere = servers()  # another port: another origin
    target = elsewhere.url + "/chat/completions"
    home = servers(lambda h: _answer(h, code, b"", {"Location": target}))
    sleeps = []
    client = JudgeClient(
        home.url, "judge-1", api_key_env="JUDGE_KEY", timeout=5, retries=2, sleep=sleeps.append
    )
    out = _score_one(client, tmp_path)
    assert out["status"] == "error"
    assert f"HTTP {code} redirect" in out["error"] and target in out["error"]
    assert "not followed" in out["error"]
    assert elsewhere.requests == []  # nothing, so no Authorization, went to the other origin
    assert [r["method"] for r in home.requests] == ["POST"] and sleeps == []  # not retried
    assert "value" not in out
    # the failure is recorded like other transport failures: in the cache, asked again by a later run
    cached = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [c["status"] for c in cached] == ["error"]


def test_item01_the_proxy_environment_is_still_honoured(servers, tmp_path, monkeypatch):
    """urllib honoured http_proxy; the client that replaced it does too: the proxy gets the absolute URL."""
    proxy = servers()
    for var in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/v1"))
    client = JudgeClient("http://judge.invalid:8000/v1", "judge-1", timeout=5, retries=0)
    assert _score_one(client, tmp_path)["value"] == 5
    assert [r["method"] for r in proxy.requests] == ["POST"] and proxy.paths == [
        "http://judge.invalid:8000/v1/chat/completions"
    ]


# ----------------------------------------------------------------------------------------------------------
# Item 3: reply size and total deadline


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
def test_item03_reply_larger_than_the_cap_is_refused(servers, tmp_path, length):
    big = b'{"choices": [{"message": {"content": "Score: 5 ' + b"x" * 300_000 + b'"}}]}'
    srv = servers(lambda h: _answer(h, 200, big, length=length))
    client = JudgeClient(
        srv.url, "judge-1", timeout=10, retries=2, max_response_bytes=65536, sleep=lambda s: None
    )
    out = _score_one(client, tmp_path)
    assert out["status"] == "malformed"  # a final outcome: the same question gets the same reply
    assert "reply larger than 65536 bytes" in out["error"]
    assert len(srv.requests) == 1
    # A reply under the cap is read whole.
    ok = servers()
    client = JudgeClient(ok.url, "judge-1", timeout=10, max_response_bytes=len(REPLY))
    assert _score_one(client, tmp_path / "2")["value"] == 5
    assert JudgeClient(ok.url, "m").max_response_bytes == 4 << 20  # the default: 4 MiB


def _trickle_body(h):
    """Headers at once, then the body one byte every 0.1 s: every read succeeds within any timeout."""
    try:
        h.send_response(200)
        h.send_header("Content-Length", str(len(REPLY)))
        h.end_headers()
        h.wfile.flush()
        for b in REPLY:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _trickle_headers(h):
    """The status line and headers themselves one byte every 0.1 s."""
    head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(REPLY)
    try:
        for b in head:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.1)
        h.wfile.write(REPLY)
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.mark.parametrize("script", [_trickle_body, _trickle_headers], ids=["body", "headers"])
def test_item03_a_trickling_server_is_cut_at_the_total_timeout(servers, tmp_path, script):
    srv = servers(script)
    timeout = 0.6
    client = JudgeClient(srv.url, "judge-1", timeout=timeout, retries=0)
    start = time.monotonic()
    out = _score_one(client, tmp_path)
    wall = time.monotonic() - start
    assert out["status"] == "error" and "timed out after 0.6 s" in out["error"]
    # A correctness bound, not a benchmark: the full trickle takes > 4 s; the cut comes at the deadline.
    assert wall < 2 * timeout + 0.8, wall


@pytest.fixture
def tls(servers, tmp_path):
    """`servers` wrapped in TLS with a fresh self-signed certificate for 127.0.0.1 (made by openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip

    def make(script=lambda h: _answer(h)):
        srv = servers(script)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.url = srv.url.replace("http://", "https://")
        return srv

    make.cert = cert
    return make


def test_item03_https_verifies_the_certificate_and_keeps_the_deadline(tls, tmp_path, monkeypatch):
    srv = tls()
    client = JudgeClient(srv.url, "judge-1", timeout=5, retries=0)
    out = _score_one(client, tmp_path / "untrusted")
    assert out["status"] == "error" and "CERTIFICATE_VERIFY_FAILED" in out["error"]
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))  # trust this certificate (OpenSSL reads the variable)
    assert _score_one(client, tmp_path / "trusted")["value"] == 5
    slow = tls(_trickle_body)
    client = JudgeClient(slow.url, "judge-1", timeout=0.6, retries=0)
    start = time.monotonic()
    out = _score_one(client, tmp_path / "slow")
    assert out["status"] == "error" and "timed out after 0.6 s" in out["error"]
    assert time.monotonic() - start < 2 * 0.6 + 0.8


def test_item03_judge_timeout_help_says_it_bounds_the_whole_request():
    import argparse

    from fasttune.cli import eval as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_subparser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "connect/read" not in text
    assert "--judge-timeout" in text and "whole-requestseconds" in "".join(text.split())


# ----------------------------------------------------------------------------------------------------------
# Item 2: reading a model folder


def _model_folder(path: Path, tokenizer: bool = True) -> Path:
    write_checkpoint(path, "qwen2_tied")
    if tokenizer:
        write_builtin_tokenizer(path)
    return path


def _limited(limit_bytes: int = 3 << 30):
    """A child's address space capped, so that a regression shows as a failure, not a swapping machine."""

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _cli(*args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fasttune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limited(),
    )


def test_item02_dev_zero_as_tokenizer_config_fails_fast(tmp_path):
    folder = _model_folder(tmp_path / "m")
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to("/dev/zero")
    start = time.monotonic()
    r = _cli("info", str(folder))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "tokenizer_config.json" in lines[0] and "/dev/zero" in lines[0]
    assert "not a regular file (a character device)" in lines[0]
    assert time.monotonic() - start < 60
    with pytest.raises(TokenizerError, match="not a regular file"):
        fasttune.load_tokenizer(folder)


def _unblock_later(fifo: Path, stop: threading.Event, after: float = 10.0) -> None:
    """Code that opens a FIFO blocks until a writer comes: this writer comes after `after` s unless
    `stop` is set first, so that a regression fails the test instead of hanging it."""

    def write():
        if stop.wait(after):
            return
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is reading it: the code refused it without opening, as it should
            return
        if stat.S_ISFIFO(os.fstat(fd).st_mode):  # never write into a file the test has put back since
            os.write(fd, b"{}")
        os.close(fd)

    threading.Thread(target=write, daemon=True).start()


def test_item02_fifos_devices_and_folders_are_refused(tmp_path):
    folder = _model_folder(tmp_path / "m")
    cases = [
        ("tokenizer_config.json", fasttune.load_tokenizer, TokenizerError),
        ("chat_template.jinja", fasttune.load_tokenizer, TokenizerError),
        ("config.json", fasttune.check_checkpoint, ConfigError),
        ("model.safetensors", fasttune.load_model, CheckpointError),
    ]
    for name, load, error in cases:
        f = folder / name
        saved = f.read_bytes() if f.exists() else None
        f.unlink(missing_ok=True)
        os.mkfifo(f)
        stop = threading.Event()
        _unblock_later(f, stop)
        start = time.monotonic()
        with pytest.raises(error, match=rf"{name}: not a regular file \(a FIFO\)"):
            load(folder)
        stop.set()
        assert time.monotonic() - start < 5, name
        f.unlink()
        f.mkdir()
        with pytest.raises(error, match=rf"{name}: not a regular file \(a folder\)"):
            load(folder)
        f.rmdir()
        if saved is not None:
            f.write_bytes(saved)
    # A weights file that links to a device is refused before it is opened.
    (folder / "model.safetensors").rename(folder / "real.safetensors")
    (folder / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"model\.safetensors -> /dev/zero: not a regular file"):
        fasttune.check_checkpoint(folder)


@pytest.mark.parametrize(
    "name, size, cap",
    [
        ("config.json", (1 << 20) + 1, 1 << 20),
        ("tokenizer_config.json", (16 << 20) + 1, 16 << 20),
        ("chat_template.jinja", (1 << 20) + 1, 1 << 20),
        ("tokenizer.json", (128 << 20) + 1, 128 << 20),
    ],
)
def test_item02_files_over_their_cap_are_refused_unread(tmp_path, name, size, cap):
    folder = _model_folder(tmp_path / "m")
    with open(folder / name, "wb") as f:  # sparse: the size without the disk space
        f.truncate(size)
    load = fasttune.check_checkpoint if name == "config.json" else fasttune.load_tokenizer
    error = ConfigError if name == "config.json" else TokenizerError
    with pytest.raises(error, match=rf"{name}: {size} bytes, larger than the {cap} bytes"):
        load(folder)


def test_item02_a_file_longer_than_its_stat_size_is_cut_at_the_cap(tmp_path):
    """procfs files report size 0 and have content: the read itself stops at the cap, not the stat."""
    from fasttune.io.safe_read import read_text

    f = tmp_path / "t.txt"
    f.write_text("x" * 100)
    assert read_text(f, cap=100, error=TokenizerError) == "x" * 100
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(TokenizerError, match="status: more than 100 bytes, larger than the 100 bytes"):
        read_text("/proc/self/status", cap=100, error=TokenizerError)


GOOD = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
        ({"num_hidden_layers": 1025}, "num_hidden_layers"),
        ({"hidden_size": 65536 * 2}, "hidden_size"),
        ({"intermediate_size": 10**7}, "intermediate_size"),
        ({"vocab_size": 10**8}, "vocab_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 64}, "num_attention_heads"),
        ({"num_key_value_heads": 28}, "num_key_value_heads"),
        ({"head_dim": 2048}, "head_dim"),
        ({"head_dim": 63}, "head_dim"),
        ({"hidden_size": 900}, "hidden_size"),  # not a multiple of 14 heads, and no head_dim given
        ({"max_position_embeddings": 10**12}, "max_position_embeddings"),
        ({"max_position_embeddings": "32768"}, "max_position_embeddings"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"use_sliding_window": True, "sliding_window": -5}, "sliding_window"),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "rope_scaling.factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0}},
            "rope_scaling.original_max_position_embeddings",
        ),
    ],
)
def test_item02_config_fields_outside_sane_bounds_are_refused(changes, key):
    with pytest.raises(ConfigError, match=r"^cfg\.json: .*\b" + re.escape(key) + r"\b"):
        ModelConfig.from_hf({**GOOD, **changes}, source="cfg.json")


def test_item02_real_configs_are_within_the_bounds():
    ModelConfig.from_hf(GOOD)
    # Qwen2.5-72B and Llama-3.1-405B's sizes; Qwen3's explicit head_dim (hidden 1024 != 16 x 128).
    ModelConfig.from_hf(
        {
            **GOOD,
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
        }
    )
    ModelConfig.from_hf(
        {
            **GOOD,
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 16384,
            "intermediate_size": 53248,
            "num_hidden_layers": 126,
            "num_attention_heads": 128,
            "num_key_value_heads": 8,
            "rope_theta": 5e5,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    ModelConfig.from_hf({**GOOD, "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
                         "num_key_value_heads": 8, "head_dim": 128})  # fmt: skip


def test_item02_a_billion_layers_fail_at_once_in_info_and_load_model(tmp_path):
    folder = _model_folder(tmp_path / "m", tokenizer=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    start = time.monotonic()
    r = _cli("info", str(folder))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "config.json" in r.stderr and "num_hidden_layers" in r.stderr
    assert time.monotonic() - start < 60
    with pytest.raises(ConfigError, match=r"config\.json: field num_hidden_layers=1000000000 is above"):
        fasttune.load_model(folder)


def _as_hf_cache(folder: Path, root: Path) -> Path:
    """The Hugging Face hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


def test_item02_hugging_face_cache_symlinks_keep_loading(tmp_path):
    ref = _model_folder(tmp_path / "m")
    fasttune.save_model(fasttune.load_model(ref), tmp_path / "sharded", max_shard_size="20KB")
    write_builtin_tokenizer(tmp_path / "sharded")
    ids = torch.tensor([[3, 17, 42, 5, 99]])
    expected = fasttune.load_model(ref).logits(ids)
    for source in (ref, tmp_path / "sharded"):
        snap = _as_hf_cache(source, tmp_path / f"hub-{source.name}")
        assert all(p.is_symlink() for p in snap.iterdir())
        model = fasttune.load_model(snap)
        with torch.no_grad():
            torch.testing.assert_close(model.logits(ids), expected, rtol=0, atol=0)
        tok = fasttune.load_tokenizer(snap)
        assert tok.encode("hello world") == builtin_tokenizer().encode("hello world")
        assert fasttune.check_checkpoint(snap).num_parameters == model.num_parameters()


@pytest.mark.parametrize(
    "template, what",
    [
        ("{% for i in range(100000000) %}x{% endfor %}", "OverflowError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ messages.__class__.__mro__ }}", "SecurityError|UndefinedError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_item02_template_runtime_errors_are_one_tokenizer_error(template, what):
    tok = Tokenizer(builtin_tokenizer().tk, {}, template, source="/models/x")
    with pytest.raises(TokenizerError, match=rf"^/models/x: chat template failed \(({what})\)"):
        tok.render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", [123, ["not an object", {"name": "default", "template": 5}]])
def test_item02_a_chat_template_that_is_not_text_is_one_tokenizer_error(template):
    with pytest.raises(TokenizerError, match="^/models/x: chat_template must be text, got int"):
        Tokenizer(builtin_tokenizer().tk, {"chat_template": template}, source="/models/x")
