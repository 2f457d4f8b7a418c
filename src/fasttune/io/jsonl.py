"""One JSONL line reader and one strict JSON line parser, used by every reader of JSONL files.

Lines end at b"\\n" only (a trailing "\\r" goes with it): `str.splitlines()` also splits at U+2028, U+2029
and U+0085, which JSON allows raw inside a string, and so would cut one valid record into bogus pieces and
shift every later line number. The file is read in binary, one line at a time, so that:

* a line that is not UTF-8 is a problem of that line (naming it), not of the whole file;
* a line longer than a byte limit is refused by its length alone, before it is decoded, parsed or
  tokenized, and without ever holding more than the limit in memory.

The parser refuses what `json.loads` accepts silently or cannot survive: duplicate keys (json keeps the
last value and drops the first), lone surrogates (`"\\ud800"` is valid JSON but not Unicode, and fails
later in the tokenizer or when written back as UTF-8), and deep nesting (RecursionError in json itself, or
in whatever walks the record later).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fasttune.errors import FasttuneError

# Qwen2.5's longest token is 128 bytes (a run of 128 spaces), and JSON's \uXXXX escapes at most triple a
# character's UTF-8 bytes (12 bytes for a 4-byte character), so the text of max_seq_len tokens takes at most
# 384 bytes per token in a JSONL line; 1 MiB on top leaves room for metadata fields, which are not
# tokenized. A line past this cannot be a conversation that fits, and reading it whole is what made a 50 MB
# line take 300 s and 7.3 GB before the token count refused it.
BYTES_PER_TOKEN = 384
LINE_SLACK_BYTES = 1 << 20
DEFAULT_MAX_SEQ_LEN = 2048  # TokenizeOptions' default, for readers that do not tokenize
KEPT_BYTES = 4096  # of a refused overlong line: enough to recognise it in a report or rejects.jsonl
MAX_DEPTH = 100  # nesting levels of arrays and objects in one record (json itself fails near 1,000)


class DataError(FasttuneError, ValueError):
    """Bad data; `problems` lists every one found, each naming its file and line."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


class LineError(ValueError):
    """Why one line's JSON cannot be used; the reader adds the file and line."""


def line_byte_limit(max_seq_len: int) -> int:
    """The longest line (in bytes, without its newline) that can hold a conversation of max_seq_len tokens."""
    return BYTES_PER_TOKEN * max_seq_len + LINE_SLACK_BYTES


@dataclass(frozen=True)
class Line:
    """Line `number` (from 1) of a file without its line ending. `problem` says why it could not be read
    (not UTF-8, too long); `text` is then what can be shown of it: undecodable bytes as \\xNN, or the
    first KEPT_BYTES of an overlong line."""

    number: int
    text: str
    problem: str | None = None


def _open_regular(path: Path, what: str, hint: str):
    """The file opened for binary reading, or one DataError naming it: missing, a folder, a device or a
    pipe (/dev/zero would be an endless line), or unreadable."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: what counts is the file they lead to
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found{hint}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a device, pipe or socket), not a {what}")
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_lines(
    path: str | os.PathLike,
    what: str = "file",
    max_bytes: int | None = None,
    limit_note: str = "",
    hint: str = "",
) -> Iterator[Line]:
    """The lines of a text file, split at b"\\n" only, each decoded on its own.

    `what` names the file in errors ("data file", "prompt file", ...) and `hint` follows "not found".
    With `max_bytes`, a longer line is not kept: it yields a Line with a problem ("line of N bytes, over
    the limit of M bytes" + `limit_note`) and only its first KEPT_BYTES. A UTF-8 byte order mark at the
    start of the file is dropped. Raises DataError (before the first line) when the file cannot be read."""
    path = Path(path)
    with _open_regular(path, what, hint) as f:
        number = 0
        while True:
            raw = f.readline(-1 if max_bytes is None else max_bytes + 1)
            if not raw:
                return
            number += 1
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n") or max_bytes is None or len(raw) <= max_bytes:
                yield _decoded(number, raw.removesuffix(b"\n").removesuffix(b"\r"))
                continue
            size = len(raw)
            kept = raw[:KEPT_BYTES]
            while not raw.endswith(b"\n"):  # skip the rest in bounded pieces, counting them
                raw = f.readline(1 << 20)
                if not raw:
                    break
                size += len(raw)
            size -= raw.endswith(b"\n")
            yield Line(
                number,
                kept.decode("utf-8", "backslashreplace"),
                f"line of {size} bytes, over the limit of {max_bytes} bytes{limit_note}; "
                f"its first {KEPT_BYTES} bytes are kept",
            )


def _decoded(number: int, raw: bytes) -> Line:
    try:
        return Line(number, raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Line(
            number,
            raw.decode("utf-8", "backslashreplace"),
            f"not UTF-8 text ({e.reason} at byte {e.start} of the line)",
        )


def ends_with_newline(path: str | os.PathLike) -> bool:
    """Whether a non-empty file's last byte is b"\\n" (an appender must then not start a new line itself)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------------------------------------
# Parsing one line


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise LineError(f"duplicate key {key!r}")
            seen.add(key)
    return record


# One decoder for every line: json.loads with a hook builds a new one per call (a third of its time here).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def parse_json(text: str):
    """The JSON value of one line; raises LineError with the reason when it is not valid JSON, repeats a
    key in an object, holds a lone surrogate, or nests deeper than MAX_DEPTH."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise LineError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise LineError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    # Strict UTF-8 decoding never yields a surrogate, so one can only come from a \u escape; and fewer
    # brackets than MAX_DEPTH cannot nest deeper. Most lines pass both and skip the walk.
    if "\\u" in text or text.count("[") + text.count("{") > MAX_DEPTH:
        fault = _fault(value)
        if fault:
            raise LineError(fault)
    return value


def _fault(value) -> str | None:
    """The first lone surrogate or excess of depth in `value`, named by its path; None when it has none.
    Walked with an explicit stack, so that the walk itself cannot recurse too deeply."""
    stack = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if _has_surrogate(v):
                return _surrogate_reason(v, f"'{path}'" if path else "the record")
        elif isinstance(v, dict | list):
            if depth >= MAX_DEPTH:
                return f"invalid JSON: nested deeper than {MAX_DEPTH} levels"
            if isinstance(v, dict):
                for k, item in v.items():
                    if _has_surrogate(k):
                        return _surrogate_reason(k, f"a key of '{path}'" if path else "a key of the record")
                    stack.append((item, f"{path}.{k}" if path else k, depth + 1))
            else:
                stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v))
    return None


def _has_surrogate(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_reason(s: str, where: str) -> str:
    first = next(ch for ch in s if 0xD800 <= ord(ch) <= 0xDFFF)
    return f"invalid unicode (lone surrogate \\u{ord(first):04x}) in {where}"
