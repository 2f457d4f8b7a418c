"""Instruction data as records: read JSONL, validate, deduplicate, split.

Three formats, detected per file from its first valid record or named by the caller:
  io        {"input": ..., "output": ..., <any other fields: kept as metadata>}
  messages  {"messages": [{"role": ..., "content": ...}, ...], <metadata>}
  alpaca    {"instruction": ..., "input": ... (may be empty or absent), "output": ..., <metadata>}
Each becomes a list of chat messages; the line as read is kept so that splits are written back verbatim.

Every problem is reported as `file:line: reason`, all of them at once. By default any problem stops the
read with the whole report (`DataError`); with `skip_bad` the bad lines are left out and written, with
their reasons, to a rejects file, so nothing is lost silently. A file left with no usable example is an
error either way. Lines are read and parsed by fasttune.io.jsonl (split at "\n" only, decoded one by one,
refused by length before parsing, strict about duplicate keys, lone surrogates and nesting).

The split is grouped: all examples whose response is the same (after normalisation) land in one split.
The reference corpus has about four prompts per saying, so a per-example split would put three quarters
of the test sayings into training. It is also stratified by a metadata key (`meta_template` by default)
and deterministic from a seed.
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttune.choices import DATA_FORMATS as FORMATS
from fasttune.choices import SPLITS
from fasttune.data.text_stats import normalize_text
from fasttune.io.atomic import atomic_file
from fasttune.io.jsonl import (
    DEFAULT_MAX_SEQ_LEN,
    DataError,
    LineError,
    line_byte_limit,
    parse_json,
    read_lines,
)

ROLES = ("system", "user", "assistant")


@dataclass
class Problem:
    file: str
    line: int
    reason: str
    text: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Example:
    """One conversation: messages ending with the assistant's response, metadata, and where it came from."""

    messages: list[dict]
    meta: dict = field(default_factory=dict)
    file: str = ""
    line: int = 0
    raw: str = ""
    weight: float = 1.0

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


class _Bad(Exception):
    """A record-level problem; the reader adds file and line."""


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if "input" in record or "output" in record:
        return "io"
    return None


# Characters that show nothing: format controls (zero-width space and joiners, the byte order mark, soft
# hyphen), space, line and paragraph separators, and control characters. A text made of these alone is
# empty to a reader and gives the model nothing to learn, so it counts as empty like whitespace does.
_INVISIBLE = frozenset(("Cf", "Zs", "Zl", "Zp", "Cc"))


def is_blank(text: str) -> bool:
    """No visible character: only whitespace and characters of the categories in _INVISIBLE."""
    for ch in text:  # a loop, not all(...): most texts end it at their first character
        if not ch.isspace() and unicodedata.category(ch) not in _INVISIBLE:
            return False
    return True


def _string(record: dict, key: str, *, required: bool = True, empty_ok: bool = False) -> str:
    if key not in record:
        if required:
            raise _Bad(f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' must be a string, got {type(value).__name__}")
    if not empty_ok and is_blank(value):
        raise _Bad(f"empty {'output' if key == 'output' else 'field ' + repr(key)}")
    return value


def _check_roles(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"message {i} must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise _Bad(f"message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _Bad(f"message {i}: 'content' must be a string, got {type(m.get('content')).__name__}")
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected:
        raise _Bad(
            f"bad order of roles: {', '.join(roles) or 'none'} (expected an optional system message, "
            "then user and assistant turns alternating, ending with assistant)"
        )
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and is_blank(m["content"]):
            raise _Bad(f"empty output (message {i})")


def to_messages(record, fmt: str) -> tuple[list[dict], dict]:
    """(messages, metadata) of a record in format `fmt`; raises _Bad with the reason."""
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "io":
        prompt, output = _string(record, "input"), _string(record, "output")
        meta = {k: v for k, v in record.items() if k not in ("input", "output")}
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], meta
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", required=False, empty_ok=True)
        output = _string(record, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        meta = {k: v for k, v in record.items() if k not in ("instruction", "input", "output")}
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], meta
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise _Bad("field 'messages' must be a list" if "messages" in record else "missing field 'messages'")
    _check_roles(messages)
    meta = {k: v for k, v in record.items() if k != "messages"}
    return [{"role": m["role"], "content": m["content"]} for m in messages], meta


def read_jsonl(
    path: str | os.PathLike, fmt: str | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> tuple[list[Example], list[Problem]]:
    """All valid examples of one file and the problems of the others. A line longer than
    `line_byte_limit(max_seq_len)` bytes is a problem, found by its length before it is parsed."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    lines = read_lines(
        path, "data file", line_byte_limit(max_seq_len), limit_note=f" for max_seq_len={max_seq_len}"
    )
    examples, problems = [], []
    detected_at = None
    for line in lines:
        n, text = line.number, line.text
        if line.problem:  # not UTF-8, or too long: a problem of this line only
            problems.append(Problem(str(path), n, line.problem, text))
            continue
        if not text.strip():
            continue
        try:
            record = parse_json(text)
        except LineError as e:
            problems.append(Problem(str(path), n, str(e), text))
            continue
        if fmt is None and isinstance(record, dict):
            fmt = detect_format(record)
            detected_at = n if fmt else None
            if fmt is None:
                problems.append(
                    Problem(
                        str(path),
                        n,
                        "cannot tell the format: no 'messages', 'instruction' "
                        f"or 'input'/'output' field (keys: {', '.join(record) or 'none'})",
                        text,
                    )
                )
                continue
        try:
            messages, meta = to_messages(record, fmt or "io")
        except _Bad as e:
            how = f" (format {fmt} detected at line {detected_at})" if detected_at else ""
            problems.append(Problem(str(path), n, f"{e}{how}", text))
            continue
        examples.append(Example(messages, meta, str(path), n, text))
    if not examples and not problems:
        problems.append(Problem(str(path), 0, "no records (the file is empty)"))
    return examples, problems


@dataclass
class Source:
    """A data file, its format (None: detect) and its weight in training: each of its training examples
    is seen `weight` times per epoch (a fraction takes a seeded subset)."""

    path: str
    format: str | None = None
    weight: float = 1.0


def read_sources(
    sources: list[Source | str], skip_bad: bool = False, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> tuple[list[Example], list[Problem]]:
    """Read and validate every file: (examples, problems). Any problem raises DataError with the whole
    report unless `skip_bad`, when the caller gets the problems to write to a rejects file. Even then a
    file with no usable example is an error: skipping bad lines must not quietly drop a whole file."""
    sources = [Source(str(s)) if isinstance(s, str | os.PathLike) else s for s in sources]
    examples, problems, barren = [], [], []
    for src in sources:
        if src.weight < 0:
            raise DataError(f"{src.path}: weight must be >= 0, got {src.weight}")
        got, bad = read_jsonl(src.path, src.format, max_seq_len)
        for e in got:
            e.weight = src.weight
        if not got:
            barren.append(str(Path(src.path)))
        examples += got
        problems += bad
    if problems and not skip_bad:
        raise DataError(report(problems, len(sources)), problems)
    if barren:
        theirs = [p for p in problems if p.file in barren]
        raise DataError(f"no usable examples in {', '.join(barren)}: {report(theirs, len(sources))}", theirs)
    return examples, problems


def write_rejects(path: str | os.PathLike, problems: list[Problem]) -> None:
    write_jsonl(
        path, [{"file": p.file, "line": p.line, "reason": p.reason, "text": p.text} for p in problems]
    )


def report(problems: list[Problem], n_files: int, most: int = 200) -> str:
    """Every problem, each as `file:line: reason`. The first line names the first one, so that the error
    line alone (all a log or a terminal may keep) already says where to look; the rest follow, one a line."""
    if not problems:
        return f"no problem found in {n_files} file(s)"
    files = len({p.file for p in problems})
    head = f"{len(problems)} problem(s) in {files} of {n_files} file(s): {problems[0]}"
    if len(problems) == 1:
        return head
    lines = [f"{head}; all of them:"] + [f"  {p}" for p in problems[:most]]
    if len(problems) > most:
        lines.append(f"  ... and {len(problems) - most} more")
    return "\n".join(lines)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any] | str]) -> None:
    """One JSON object (or an already serialised line) per line, written beside `path` and renamed into
    place: a reader (or a crash) sees either the old file or the whole new one, never a partial one."""
    with atomic_file(path) as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            f.write("\n")


# ----------------------------------------------------------------------------------------------------------
# Deduplication


@dataclass
class DedupStats:
    exact: int = 0  # dropped: identical to an earlier example, message for message
    normalized: int = 0  # dropped: identical after case, whitespace and punctuation are normalised
    near_duplicate_responses: int = 0  # kept, counted: distinct responses one word away from another


def dedup(examples: list[Example]) -> tuple[list[Example], DedupStats]:
    """Drop exact and normalised duplicates (the first occurrence stays); count near-duplicate responses."""
    stats = DedupStats()
    seen_exact, seen_norm, kept = set(), set(), []
    for e in examples:
        exact = tuple((m["role"], m["content"]) for m in e.messages)
        norm = tuple((m["role"], normalize_text(m["content"])) for m in e.messages)
        if exact in seen_exact:
            stats.exact += 1
        elif norm in seen_norm:
            stats.normalized += 1
        else:
            kept.append(e)
        seen_exact.add(exact)
        seen_norm.add(norm)
    stats.near_duplicate_responses = count_near_duplicates([normalize_text(e.response) for e in kept])
    return kept, stats


def count_near_duplicates(texts: list[str]) -> int:
    """How many distinct texts are one word away (one word changed, added or removed) from another.

    Linear time: each text of w words maps to w keys with one word blanked (substitutions) and w keys with
    one word removed; two texts one edit apart share a key (a deletion from the longer one equals the
    shorter one itself, which is also a key)."""
    distinct = sorted(set(texts))
    buckets = defaultdict(set)
    for i, t in enumerate(distinct):
        words = t.split()
        buckets[("=",) + tuple(words)].add(i)
        for j in range(len(words)):
            buckets[("*", j) + tuple(words[:j] + words[j + 1 :])].add(i)  # substitution at j
            buckets[("=",) + tuple(words[:j] + words[j + 1 :])].add(i)  # deletion at j
    near = set()
    for members in buckets.values():
        if len(members) > 1:
            near |= members
    return len(near)


# ----------------------------------------------------------------------------------------------------------
# Split


def split(
    examples: list[Example],
    ratios=(0.9, 0.05, 0.05),
    seed: int = 0,
    stratify_key: str | None = "meta_template",
) -> dict[str, list[Example]]:
    """Grouped by normalised response, stratified by `stratify_key` when the examples carry it, seeded.

    Within each stratum the groups are shuffled, then each goes to the split furthest below its target
    share of the stratum's examples, which lands within one group of the exact ratios."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        groups[normalize_text(e.response)].append(e)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[str(members[0].meta.get(stratify_key, "")) if stratify_key else ""].append(key)

    out = {s: [] for s in SPLITS}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        random.Random(f"{seed}:{stratum}").shuffle(keys)
        total = sum(len(groups[k]) for k in keys)
        counts = [0, 0, 0]
        for k in keys:
            deficit = [ratios[i] * total - counts[i] if ratios[i] > 0 else float("-inf") for i in range(3)]
            i = max(range(3), key=lambda j: deficit[j])
            counts[i] += len(groups[k])
            out[SPLITS[i]].extend(groups[k])
    for s in SPLITS:  # file order within a split, so that writing it back is stable
        out[s].sort(key=lambda e: (e.file, e.line))
    return out


def group_counts(examples: list[Example], key: str) -> Counter:
    return Counter(str(e.meta.get(key, "(none)")) for e in examples)
