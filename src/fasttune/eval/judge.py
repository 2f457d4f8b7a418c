"""An LLM judge behind an OpenAI-compatible chat-completions endpoint: 1-5 rubric scores and pairwise A/B.

Only the standard library (urllib + json): a judge is optional and must not add a dependency.

The client. `JudgeClient(url, model)` POSTs `{"model", "messages", "temperature": 0, "max_tokens"}` to
`<url>/chat/completions` (or to `url` itself when it already ends with that) and reads
`choices[0].message.content`. The API key, when one is needed, is read from the environment variable
named by `api_key_env` and sent as `Authorization: Bearer ...`; only the variable's name is ever written
to a report. `timeout` bounds the whole request, connect to last byte, and a reply body is read up to
`max_response_bytes` (default 4 MiB), past which it is `malformed`; a redirect (3xx) is never followed,
so the key never goes to another origin: it is an `error` naming the `Location`, not retried
(judge_http.py says why urllib is not used).
Retried with exponential backoff (`backoff` s, doubled each time, at most 30 s; a numeric
`Retry-After` is honoured up to the same cap), up to `retries` more attempts: timeouts, refused or
dropped connections, HTTP 408, 429 and 5xx. Not retried: a reply that arrives but cannot be used
(`malformed`: a body that is not JSON or has no `choices[0].message.content` string, or content with no
score or verdict found), and HTTP 400 (`error`: the request itself is refused, e.g. too long). HTTP 401,
403 and 404 stop the run with a `JudgeError` (a wrong key, model or URL fails every item alike);
everything obtained before is already in the cache.

The cache. Every outcome is appended as one JSON line to the cache file as it arrives (flushed and
fsynced), keyed by a hash of everything that determines the answer: the kind, the judge model, the
prompt template and the texts. A second run with the same cache reads it first and asks only for the
items that have no final outcome yet: a score, a verdict or a `malformed` reply are final (asking a
temperature-0 judge again would give the same reply); transport failures (`error`) are asked again. A
line cut short by a crash is skipped on reading, and the next append starts on a fresh line.

Rubric prompt files. A UTF-8 text template with the placeholders `{instruction}` (the user's request;
for a multi-turn conversation, the turns before the response as "User: ..." / "Assistant: ..." lines)
and `{response}` (the text judged), each required at least once, and optionally `{reference}` (the test
set's reference response). Pairwise templates use `{instruction}`, `{response_a}` and `{response_b}`
(each required) and optionally `{reference}`. Placeholders are replaced in one pass, so a response that
itself contains "{instruction}" is left as written; any other `{lowercase_name}` is an error naming the
file and line (literal braces such as JSON examples are fine).

Parsing a score. A scale written in the reply ("(1-5)", "1 to 5") is ignored first; then the first
rule that applies:
  1. the last "score" followed within 20 characters, on the same line, by an integer ("Score: 4",
     "**Score**: 4", "score of 4"); an integer outside 1-5 there makes the reply malformed;
  2. the last "N/5" or "N out of 5";
  3. a reply that is a single integer once markup (* _ [ ] ( ) . : and spaces) is removed;
  4. the reply's standalone integers (not part of a decimal or a longer number): exactly one distinct
     value in 1-5 and no other integer -> that value.
Anything else is malformed ("no score" or "ambiguous"). Parsing a verdict: the last "verdict" followed
within 20 characters by A, B or tie ("Verdict: A", "[[verdict]]: tie"); else a reply that is just A, B
or tie once markup is removed; else malformed.

Pairwise comparison asks each pair in both orders (the first model's response as A, then as B), because
judges favour one position; the two verdicts, from the first model's side (+1 win, 0 tie, -1 loss), are
added: a positive sum is a win, a negative one a loss, zero a tie, so a pair whose verdict follows the
position (A both times) counts as a tie. `consistent` is the share of complete pairs whose two verdicts
agree. Two responses equal after `text_stats.normalize_text` are a tie without asking. A pair with either
order malformed or failed is `incomplete` and left out of the rates.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fasttune.data.text_stats import normalize_text
from fasttune.eval import judge_http
from fasttune.eval.judge_prompts import (
    DEFAULT_PAIRWISE,
    DEFAULT_RUBRIC,
    JudgeError,
    PromptTemplate,
    load_template,
    parse_score,
    parse_template,
    parse_verdict,
)
from fasttune.io.jsonl import LineError, ends_with_newline, parse_json, read_lines

log = logging.getLogger("fasttune")

MAX_BACKOFF = 30.0
FATAL_STATUS = (401, 403, 404)
RETRY_STATUS = (408, 429)

# ----------------------------------------------------------------------------------------------------------
# The HTTP client


class _Failure(Exception):
    """One attempt failed; `retry` says whether another attempt may help, `status` is 'error' or
    'malformed'."""

    def __init__(self, status: str, message: str, retry: bool, wait: float | None = None):
        super().__init__(message)
        self.status, self.retry, self.wait = status, retry, wait


@dataclass
class JudgeClient:
    url: str
    model: str
    api_key_env: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_tokens: int = 512
    max_response_bytes: int = 4 << 20  # a chat reply of max_tokens is a few KiB; 4 MiB is far above any
    sleep: Callable[[float], None] = time.sleep  # tests pass a recorder

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge-url must start with http:// or https://, got {self.url!r}")
        base = self.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise JudgeError(f"the judge's API key variable {self.api_key_env} is not set or empty")

    def describe(self) -> dict:
        """What a report records about the judge: never the key itself."""
        return {
            "url": self.endpoint,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "timeout": self.timeout,
            "retries": self.retries,
        }

    def _attempt(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env is not None:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        try:
            reply = judge_http.post(self.endpoint, body, headers, self.timeout, self.max_response_bytes)
        except TimeoutError:
            raise _Failure("error", f"timed out after {self.timeout:g} s", retry=True) from None
        except judge_http.ReplyTooLarge:
            raise _Failure(
                "malformed", f"reply larger than {self.max_response_bytes} bytes, not read", retry=False
            ) from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, ConnectionRefusedError | socket.gaierror):
                raise _Failure("error", f"cannot reach {self.endpoint}: {e}", retry=True) from None
            raise _Failure("error", f"connection to {self.endpoint} failed: {e!r}", retry=True) from None
        if 300 <= reply.status < 400:
            # Never followed: a redirect would carry the key to another origin and turn the POST into a GET.
            raise _Failure(
                "error",
                f"HTTP {reply.status} redirect from {self.endpoint} to {reply.headers.get('Location')}: not "
                "followed (the judge sends its key only to --judge-url; give the final address there)",
                retry=False,
            )
        if reply.status >= 400:
            detail = _excerpt(reply.body)
            message = f"HTTP {reply.status} from {self.endpoint}" + (f": {detail}" if detail else "")
            if reply.status in FATAL_STATUS:
                raise JudgeError(message)
            raise _Failure(
                "error",
                message,
                retry=reply.status >= 500 or reply.status in RETRY_STATUS,
                wait=_retry_after(reply.headers.get("Retry-After")),
            )
        try:
            content = json.loads(reply.body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise _Failure(
                "malformed", f"not a chat-completions reply: {_excerpt(reply.body)}", retry=False
            ) from None
        if not isinstance(content, str):
            raise _Failure("malformed", f"message content is {type(content).__name__}, not text", retry=False)
        return content

    def complete(self, prompt: str) -> str:
        """The judge's reply to one user message; raises _Failure after the retries, JudgeError when
        nothing will work."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(body)
            except _Failure as f:
                if not f.retry or attempt == self.retries:
                    if f.retry:
                        f.args = (f"{f} (after {attempt + 1} attempts)",)
                    raise
                wait = min(MAX_BACKOFF, f.wait if f.wait is not None else self.backoff * 2**attempt)
                log.info("judge: %s; retrying in %.2f s", f, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")


def _excerpt(raw: bytes, most: int = 200) -> str:
    text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text if len(text) <= most else text[:most] + "..."


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to the exponential backoff
        return None


# ----------------------------------------------------------------------------------------------------------
# The cache


class JudgeCache:
    """Outcomes by key, from a JSONL file that every new outcome is appended to at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise JudgeError(f"{self.path}: the judge cache must be a file, not a folder")
        if self.path.exists():
            for line in read_lines(self.path, "judge cache"):
                if not line.text.strip() and not line.problem:
                    continue
                try:
                    if line.problem:
                        raise LineError(line.problem)
                    record = parse_json(line.text)
                    key = record["key"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable judge cache line skipped", self.path, line.number)
                    continue
                # A final outcome is never replaced; a later line may replace a failure.
                if not _final(self.records.get(key)):
                    self.records[key] = record
            self._needs_newline = not ends_with_newline(self.path)
        else:
            self._needs_newline = False

    def get(self, key: str) -> dict | None:
        record = self.records.get(key)
        return record if _final(record) else None

    def add(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                if self._needs_newline:  # the previous run died mid-line: start clean
                    f.write("\n")
                    self._needs_newline = False
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.records[record["key"]] = record


def _final(record: dict | None) -> bool:
    return record is not None and record.get("status") in ("ok", "malformed", "identical")


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------
# Rubric scores and pairwise comparisons


@dataclass
class Item:
    instruction: str
    response: str
    reference: str = ""


def _ask(client: JudgeClient, cache: JudgeCache, key: str, prompt: str, parse, base: dict) -> dict:
    try:
        reply = client.complete(prompt)
    except _Failure as f:
        record = {**base, "key": key, "status": f.status, "error": str(f)}
    else:
        value, why = parse(reply)
        record = {**base, "key": key, "reply": reply}
        record.update(
            {"status": "ok", "value": value} if value is not None else {"status": "malformed", "error": why}
        )
    cache.add(record)
    return record


def _run(jobs: list[Callable[[], dict]], workers: int) -> list[dict]:
    """Run the jobs (one judge request each), `workers` at a time, results in job order. A JudgeError
    stops the rest: those already answered are in the cache."""
    if workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except JudgeError:
            for f in futures:
                f.cancel()
            raise


def score_items(
    client: JudgeClient,
    items: Sequence[Item],
    template: PromptTemplate,
    cache: JudgeCache,
    workers: int = 1,
) -> list[dict]:
    """One outcome per item (status ok with `value` 1-5, malformed, or error), asking only for items the
    cache has no final outcome for."""
    out: list[dict | None] = []
    jobs, slots = [], []
    for i, item in enumerate(items):
        key = _key("rubric", client.model, template.digest, item.instruction, item.response, item.reference)
        cached = cache.get(key)
        out.append(cached)
        if cached is None:
            prompt = template.render(
                instruction=item.instruction, response=item.response, reference=item.reference
            )
            base = {"kind": "rubric", "index": i}
            jobs.append(lambda k=key, p=prompt, b=base: _ask(client, cache, k, p, parse_score, b))
            slots.append(i)
    for i, record in zip(slots, _run(jobs, workers), strict=True):
        out[i] = record
    return out


def summarize_scores(outcomes: Sequence[dict]) -> dict:
    """Mean score, share of 1s and 2s (of the scored items), the distribution, and the failures."""
    scores = [r["value"] for r in outcomes if r["status"] == "ok"]
    counts = Counter(scores)
    n = len(scores)
    return {
        "items": len(outcomes),
        "scored": n,
        "mean": sum(scores) / n if n else None,
        "share_1_2": (counts[1] + counts[2]) / n if n else None,
        "distribution": {str(s): counts[s] for s in range(1, 6)},
        "malformed": sum(r["status"] == "malformed" for r in outcomes),
        "errors": sum(r["status"] == "error" for r in outcomes),
    }


_FROM_FIRST = {("A", 0): 1, ("B", 0): -1, ("A", 1): -1, ("B", 1): 1, ("tie", 0): 0, ("tie", 1): 0}


def compare_pairs(
    client: JudgeClient,
    instructions: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    template: PromptTemplate,
    cache: JudgeCache,
    references: Sequence[str] | None = None,
    workers: int = 1,
) -> list[dict]:
    """Per prompt: {"result": "win" | "tie" | "loss" (for `first`) | None (incomplete), "orders": [the
    outcome with first as A, the outcome with first as B]}."""
    if not len(instructions) == len(first) == len(second):
        raise ValueError(f"{len(instructions)} prompts for {len(first)} and {len(second)} responses")
    refs = references if references is not None else [""] * len(instructions)
    orders: list[list[dict | None]] = []
    jobs, slots = [], []
    for i, (instr, a, b, ref) in enumerate(zip(instructions, first, second, refs, strict=True)):
        pair: list[dict | None] = [None, None]
        if normalize_text(a) == normalize_text(b):
            pair = [
                {"kind": "pairwise", "index": i, "order": o, "status": "identical", "value": "tie"}
                for o in (0, 1)
            ]
        else:
            for order, (x, y) in enumerate(((a, b), (b, a))):
                key = _key("pairwise", client.model, template.digest, instr, x, y, ref)
                pair[order] = cache.get(key)
                if pair[order] is None:
                    prompt = template.render(instruction=instr, response_a=x, response_b=y, reference=ref)
                    base = {"kind": "pairwise", "index": i, "order": order}
                    jobs.append(lambda k=key, p=prompt, b_=base: _ask(client, cache, k, p, parse_verdict, b_))
                    slots.append((i, order))
        orders.append(pair)
    for (i, order), record in zip(slots, _run(jobs, workers), strict=True):
        orders[i][order] = record
    results = []
    for pair in orders:
        if all(r["status"] in ("ok", "identical") for r in pair):
            total = sum(_FROM_FIRST[(r["value"], o)] for o, r in enumerate(pair))
            result = "win" if total > 0 else "loss" if total < 0 else "tie"
        else:
            result = None
        results.append({"result": result, "orders": pair})
    return results


def summarize_pairs(results: Sequence[dict]) -> dict:
    """Win, tie and loss rates of the first model over the complete pairs, how often the two orders
    agreed, and how often the judge chose position A (position bias)."""
    done = [r for r in results if r["result"] is not None]
    n = len(done)
    counts = Counter(r["result"] for r in done)
    asked = [o for r in done for o in r["orders"] if o["status"] == "ok"]
    consistent = sum(
        _FROM_FIRST[(r["orders"][0]["value"], 0)] == _FROM_FIRST[(r["orders"][1]["value"], 1)] for r in done
    )
    return {
        "pairs": len(results),
        "complete": n,
        "win": counts["win"] / n if n else None,
        "tie": counts["tie"] / n if n else None,
        "loss": counts["loss"] / n if n else None,
        "consistent": consistent / n if n else None,
        "position_a_share": sum(o["value"] == "A" for o in asked) / len(asked) if asked else None,
        "identical": sum(r["orders"][0]["status"] == "identical" for r in done),
        "incomplete": len(results) - n,
    }


__all__ = [
    "DEFAULT_PAIRWISE",
    "DEFAULT_RUBRIC",
    "Item",
    "JudgeCache",
    "JudgeClient",
    "JudgeError",
    "PromptTemplate",
    "compare_pairs",
    "load_template",
    "parse_score",
    "parse_template",
    "parse_verdict",
    "score_items",
    "summarize_pairs",
    "summarize_scores",
]
