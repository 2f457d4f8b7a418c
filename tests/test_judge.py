"""The LLM-judge client against a local HTTP server that the tests script: good replies, replies after the
timeout, server errors, malformed bodies and replies without a score; the cache keeps what was obtained
and a second run asks only for what is missing."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fasttune.eval.judge import (
    DEFAULT_PAIRWISE,
    DEFAULT_RUBRIC,
    Item,
    JudgeCache,
    JudgeClient,
    JudgeError,
    compare_pairs,
    load_template,
    parse_score,
    parse_template,
    parse_verdict,
    score_items,
    summarize_pairs,
    summarize_scores,
)

# Long enough that a reply due at once arrives in time on a loaded 2-core machine (thread scheduling can
# stall for tens of milliseconds there), short enough that the replies scripted to come late cost little.
TIMEOUT = 1.0


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append(
                {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
            )
        prompt = body["messages"][0]["content"]
        action = server.script(prompt)
        kind = action[0]
        try:
            if kind == "sleep":  # answer only after the client's timeout
                time.sleep(action[1])
                kind, action = "ok", ("ok", action[2])
            if kind == "ok":
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": action[1]}}]})
                self._send(200, payload.encode())
            elif kind == "status":
                self._send(action[1], action[2].encode(), action[3] if len(action) > 3 else {})
            elif kind == "raw":
                self._send(200, action[1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _send(self, code: int, data: bytes, headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.block_on_close = False
    srv.requests, srv.lock = [], threading.Lock()
    srv.script = lambda prompt: ("ok", "Score: 3")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(url, **kw):
    sleeps = []
    defaults = dict(timeout=TIMEOUT, retries=2, backoff=0.01, sleep=sleeps.append)
    client = JudgeClient(url, "judge-1", **{**defaults, **kw})
    client.sleeps = sleeps
    return client


def _prompts(srv) -> list[str]:
    return [r["body"]["messages"][0]["content"] for r in srv.requests]


RUBRIC = "Request: {instruction}\nReply: {response}\nEnd with Score: N.\n"


def _rubric(tmp_path):
    path = tmp_path / "rubric.txt"
    path.write_text(RUBRIC)
    return load_template(path)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 4", 4),
        ("Good reply.\n**Score**: 5", 5),
        ("Clear, one small slip; a score of 3.", 3),
        ("2", 2),
        ("[[1]]", 1),
        ("I would give it 4/5.", 4),
        ("3 out of 5", 3),
        ("Score (1-5): 4", 4),
        ("On a scale of 1 to 5 this is a 2.", 2),
        ("The first 2 lines are fine; Score: 5", 5),
        ("It has 2 flaws. Rating 4", None),  # two integers, no "Score"
        ("Fluent and on topic.", None),
        ("Score: 7", None),
        ("4.5", None),
    ],
)
def test_parse_score(reply, score):
    value, why = parse_score(reply)
    assert value == score
    assert (why == "") == (score is not None)


@pytest.mark.parametrize(
    "reply, verdict",
    [("Verdict: A", "A"), ("B is longer.\nverdict: tie", "tie"), ("**B**", "B"), ("Tie.", "tie"),
     ("[[Verdict]]: b", "B"), ("A is better", None), ("Both are fine.", None)],
)  # fmt: skip
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply)[0] == verdict


def test_prompt_files_are_validated_and_named_in_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Request: {instruction}\nReply: {respnse}\n")
    with pytest.raises(JudgeError, match=r"bad\.txt:2: unknown placeholder \{respnse\}"):
        load_template(bad)
    bad.write_text("Request: {instruction}\n")
    with pytest.raises(JudgeError, match=r"bad\.txt: the prompt must contain \{response\}"):
        load_template(bad)
    bad.write_text("  \n")
    with pytest.raises(JudgeError, match="bad.txt: the prompt file is empty"):
        load_template(bad)
    bad.write_bytes(b"\xff\xfe{instruction}")
    with pytest.raises(JudgeError, match="bad.txt: not UTF-8"):
        load_template(bad)
    with pytest.raises(JudgeError, match="missing.txt: rubric prompt file not found"):
        load_template(tmp_path / "missing.txt")
    with pytest.raises(JudgeError, match=r"\{response_b\}"):
        parse_template("{instruction} {response_a}", "p.txt", ("instruction", "response_a", "response_b"),
                       ("instruction", "response_a", "response_b"))  # fmt: skip
    # Literal braces (JSON examples) are not placeholders; substitution is one pass.
    ok = tmp_path / "ok.txt"
    ok.write_text('Answer as {"score": N}.\n{instruction} / {response} / {reference}\n')
    t = load_template(ok)
    assert t.render(instruction="say {response}", response="R", reference="ref") == (
        'Answer as {"score": N}.\nsay {response} / R / ref\n'
    )
    assert "{instruction}" in DEFAULT_RUBRIC and "{response_b}" in DEFAULT_PAIRWISE
    assert load_template(None).source == "built-in rubric prompt"
    assert load_template(None, "pairwise").fields == ("instruction", "response_a", "response_b", "reference")


def test_rubric_scores_the_request_and_summary(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    scores = {"one": 1, "two": 2, "four": 4, "five": 5, "five again": 5}
    server.script = lambda p: ("ok", f"Fine.\nScore: {scores[p.split('Reply: ')[1].split(chr(10))[0]]}")
    client = _client(server.url + "/", api_key_env="MY_JUDGE_KEY")
    items = [Item(f"ask {k}", k) for k in scores]
    out = score_items(client, items, _rubric(tmp_path), JudgeCache(tmp_path / "cache.jsonl"))
    assert [r["value"] for r in out] == [1, 2, 4, 5, 5]
    s = summarize_scores(out)
    assert s["mean"] == pytest.approx(17 / 5)
    assert s["share_1_2"] == pytest.approx(2 / 5)
    assert s["distribution"] == {"1": 1, "2": 1, "3": 0, "4": 1, "5": 2}
    assert (s["scored"], s["malformed"], s["errors"]) == (5, 0, 0)
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions"
    assert r["body"]["model"] == "judge-1" and r["body"]["temperature"] == 0
    assert r["body"]["messages"][0]["content"] == "Request: ask one\nReply: one\nEnd with Score: N.\n"
    assert r["auth"] == "Bearer sk-secret"
    assert "sk-secret" not in json.dumps(client.describe())
    assert "sk-secret" not in (tmp_path / "cache.jsonl").read_text()
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(JudgeError, match="MY_JUDGE_KEY is not set"):
        _client(server.url, api_key_env="MY_JUDGE_KEY")


def test_failures_are_recorded_without_losing_scores_and_a_second_run_asks_only_the_missing(server, tmp_path):
    seen: dict[str, int] = {}

    def script(prompt):
        what = prompt.split("Reply: ")[1].split("\n")[0]
        seen[what] = seen.get(what, 0) + 1
        return {
            "good": ("ok", "Score: 4"),
            "flaky": ("status", 500, "overloaded") if seen[what] == 1 else ("ok", "Score: 2"),
            "slow": ("sleep", 3 * TIMEOUT, "Score: 5"),
            "garbled": ("raw", b"<html>proxy error</html>"),
            "chatty": ("ok", "A fine answer, I like it."),
            "busy": ("status", 503, "later", {"Retry-After": "0.05"}),
            "refused": ("status", 400, '{"error": "context length exceeded"}'),
            "last": ("ok", "score: 1"),
        }[what]

    server.script = script
    names = ["good", "flaky", "slow", "garbled", "chatty", "busy", "refused", "last"]
    items = [Item(f"q {n}", n) for n in names]
    client = _client(server.url, retries=1)
    cache_file = tmp_path / "cache.jsonl"
    out = score_items(client, items, _rubric(tmp_path), JudgeCache(cache_file))
    by = dict(zip(names, out, strict=True))
    assert by["good"]["value"] == 4 and by["flaky"]["value"] == 2 and by["last"]["value"] == 1
    assert by["slow"]["status"] == "error"
    assert f"timed out after {TIMEOUT:g} s (after 2 attempts)" in by["slow"]["error"]
    assert by["garbled"]["status"] == "malformed" and "proxy error" in by["garbled"]["error"]
    assert by["chatty"]["status"] == "malformed" and by["chatty"]["error"] == "no score found"
    assert by["chatty"]["reply"] == "A fine answer, I like it."
    assert by["busy"]["status"] == "error" and "HTTP 503" in by["busy"]["error"]
    assert by["refused"]["status"] == "error" and "context length exceeded" in by["refused"]["error"]
    # Retried: 500, the timeout and 503 (once each, retries=1); not retried: malformed replies and 400.
    assert seen == {"good": 1, "flaky": 2, "slow": 2, "garbled": 1, "chatty": 1, "busy": 2, "refused": 1,
                    "last": 1}  # fmt: skip
    assert client.sleeps == [0.01, 0.01, 0.05]  # backoff, backoff, Retry-After
    s = summarize_scores(out)
    assert (s["items"], s["scored"], s["malformed"], s["errors"]) == (8, 3, 2, 3)
    assert s["mean"] == pytest.approx(7 / 3)
    lines = [json.loads(x) for x in cache_file.read_text().splitlines()]
    assert len(lines) == 8 and {x["index"] for x in lines} == set(range(8))

    # The second run: every server answer is now good; only the transport failures are asked again.
    server.requests.clear()
    server.script = lambda p: ("ok", "Score: 3")
    out2 = score_items(_client(server.url), items, _rubric(tmp_path), JudgeCache(cache_file))
    assert sorted(p.split("Reply: ")[1].split("\n")[0] for p in _prompts(server)) == [
        "busy",
        "refused",
        "slow",
    ]
    by2 = dict(zip(names, out2, strict=True))
    assert [by2[n]["value"] for n in ("slow", "busy", "refused")] == [3, 3, 3]
    for n in ("good", "flaky", "garbled", "chatty", "last"):
        assert by2[n] == by[n]
    # A third run asks nothing.
    server.requests.clear()
    score_items(_client(server.url), items, _rubric(tmp_path), JudgeCache(cache_file))
    assert server.requests == []
    # A different rubric is a different question.
    other = tmp_path / "other.txt"
    other.write_text("Grade it. {instruction} -> {response}")
    score_items(_client(server.url), items[:2], load_template(other), JudgeCache(cache_file))
    assert len(server.requests) == 2


def test_an_interrupted_run_resumes_where_it_stopped(server, tmp_path):
    count = {"n": 0}

    def script(prompt):
        count["n"] += 1
        return ("status", 401, "bad key") if count["n"] == 4 else ("ok", "Score: 5")

    server.script = script
    items = [Item(f"q{i}", f"r{i}") for i in range(7)]
    cache_file = tmp_path / "cache.jsonl"
    with pytest.raises(JudgeError, match="HTTP 401 .*bad key"):
        score_items(_client(server.url), items, _rubric(tmp_path), JudgeCache(cache_file))
    assert len(cache_file.read_text().splitlines()) == 3  # the three scores obtained before the 401
    # A crash in the middle of a write leaves a cut line: skipped, and the next append starts afresh.
    with open(cache_file, "a") as f:
        f.write('{"key": "abc", "sta')
    server.requests.clear()
    out = score_items(_client(server.url), items, _rubric(tmp_path), JudgeCache(cache_file))
    assert [p.split("Reply: ")[1].split("\n")[0] for p in _prompts(server)] == ["r3", "r4", "r5", "r6"]
    assert [r["value"] for r in out] == [5] * 7
    assert len(JudgeCache(cache_file).records) == 7


def test_concurrent_workers_give_the_same_outcomes(server, tmp_path):
    server.script = lambda p: ("ok", f"Score: {len(p.split('Reply: ')[1].split(chr(10))[0])}")
    items = [Item(f"q{i}", "x" * (1 + i % 5)) for i in range(12)]
    out = score_items(
        _client(server.url), items, _rubric(tmp_path), JudgeCache(tmp_path / "c.jsonl"), workers=4
    )
    assert [r["value"] for r in out] == [1 + i % 5 for i in range(12)]
    assert len(server.requests) == 12
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 12


def test_an_unreachable_judge_is_an_error_per_item_after_retries(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}", retries=2)
    out = score_items(client, [Item("q", "r")], _rubric(tmp_path), JudgeCache(tmp_path / "c.jsonl"))
    assert out[0]["status"] == "error" and "cannot reach" in out[0]["error"]
    assert client.sleeps == [0.01, 0.02]  # doubled each time
    with pytest.raises(JudgeError, match="must start with http"):
        JudgeClient("localhost:8000", "m")


def test_pairwise_asks_both_orders_and_cancels_position_bias(server, tmp_path):
    def script(prompt):
        a = prompt.split("[Reply A]\n")[1].split("\n")[0]
        b = prompt.split("[Reply B]\n")[1].split("\n")[0]
        if "biased" in a + b:
            return ("ok", "Verdict: A")  # always the first position
        if "broken" in a + b:
            return ("ok", "Both have merit.")
        if "good" in a and "good" in b:
            return ("ok", "Verdict: tie")
        return ("ok", "Verdict: A" if "good" in a else "Verdict: B" if "good" in b else "Verdict: tie")

    server.script = script
    instructions = ["p0", "p1", "p2", "p3", "p4", "p5"]
    first = ["good one", "meh", "biased x", "good a", "Same text.", "broken x"]
    second = ["meh", "good two", "biased y", "good b", "same text", "broken y"]
    template = load_template(None, "pairwise")
    cache = JudgeCache(tmp_path / "pairs.jsonl")
    out = compare_pairs(_client(server.url), instructions, first, second, template, cache)
    assert [r["result"] for r in out] == ["win", "loss", "tie", "tie", "tie", None]
    prompts = _prompts(server)
    assert len(prompts) == 10  # five pairs in two orders; the identical pair is not asked
    for q, x, y in zip(instructions[:4], first[:4], second[:4], strict=True):
        asked = [(p.split("[Reply A]\n")[1].split("\n")[0], p.split("[Reply B]\n")[1].split("\n")[0])
                 for p in prompts if f"[Request]\n{q}\n" in p]  # fmt: skip
        assert sorted(asked) == sorted([(x, y), (y, x)])
    assert [o["value"] for o in out[2]["orders"]] == ["A", "A"]
    s = summarize_pairs(out)
    assert (s["pairs"], s["complete"], s["incomplete"], s["identical"]) == (6, 5, 1, 1)
    assert (s["win"], s["tie"], s["loss"]) == (
        pytest.approx(1 / 5),
        pytest.approx(3 / 5),
        pytest.approx(1 / 5),
    )
    assert s["consistent"] == pytest.approx(4 / 5)  # the biased pair's two verdicts disagree
    assert s["position_a_share"] == pytest.approx(4 / 8)  # of the 8 verdicts given: win, loss, biased, tie
    # Resumed: the malformed pair is final, nothing is asked again.
    server.requests.clear()
    again = compare_pairs(_client(server.url), instructions, first, second, template, JudgeCache(cache.path))
    assert server.requests == [] and [r["result"] for r in again] == [r["result"] for r in out]
