"""Issue 14, items 1-3: the judge never follows a redirect (nor sends its key to another origin), caps a
reply's size and bounds a request's whole time; reading a model folder is bounded (file sizes, regular
files only, config fields within sane ranges) and a chat template's runtime errors are one clear error."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fasttune.judge import Item, JudgeCache, JudgeClient, load_template, score_items

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
        srv.requests, srv.lock, srv.script = [], threading.Lock(), script
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


def test_item03_judge_timeout_help_says_it_bounds_the_whole_request():
    import argparse

    from fasttune import eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_subparser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "connect/read" not in text
    assert "--judge-timeout" in text and "whole-requestseconds" in "".join(text.split())
