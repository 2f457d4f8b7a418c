"""Bounded reading of the small files of a model folder: JSON configs, chat templates, tokenizer.json.

A model folder is input like any other: `tokenizer_config.json` may be a symlink to /dev/zero (an endless
read), a FIFO (an open that never returns) or a 20 GB file. So a file is stat'ed first, following
symlinks (a Hugging Face cache folder's files are links to ../../blobs/<hash> and must keep working), and
refused unless what it points to is a regular file no larger than its cap; it is then read with at most
cap + 1 bytes asked for, so a file that grows between the stat and the read is still caught.

The caps, against the largest real files (Qwen2.5, Qwen3, Llama 3.1, Mistral; 0.5B to 405B): config.json
and generation_config.json are under 2 KB (cap 1 MiB); chat templates under 20 KB (cap 1 MiB);
tokenizer_config.json is 7 KB for Qwen2.5 and reaches ~2 MB where it lists every added token (cap 16 MiB,
also for any other JSON such as a shard index, ~80 KB for a 72B model); tokenizer.json is 7 MB for
Qwen2.5, 9 MB for Llama 3 and 33 MB for the largest 256k-token vocabularies (cap 128 MiB).

This module imports nothing of fasttune but its errors, so that weights.py and tokenizer.py can both use it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from fasttune.errors import FasttuneError

CONFIG_CAP = 1 << 20
TEMPLATE_CAP = 1 << 20
JSON_CAP = 16 << 20
TOKENIZER_JSON_CAP = 128 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _name(path: Path) -> str:
    """The path, and where it points when it is a symlink."""
    return f"{path} -> {os.path.realpath(path)}" if path.is_symlink() else str(path)


def check_regular(
    path: str | os.PathLike, error: type[FasttuneError] = FasttuneError, cap: int | None = None
) -> int:
    """The size of `path` once it is known to be (a symlink to) a regular file of at most `cap` bytes;
    raises `error` naming the path otherwise. Nothing is opened, so a FIFO cannot block."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{_name(path)}: file not found") from None
    except OSError as e:
        raise error(f"{_name(path)}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
        raise error(f"{_name(path)}: not a regular file ({kind}); fasttune reads only regular files")
    if cap is not None and st.st_size > cap:
        raise error(_too_large(path, st.st_size, cap))
    return st.st_size


def _too_large(path: Path, size: int | str, cap: int) -> str:
    return f"{_name(path)}: {size} bytes, larger than the {cap} bytes such a file may have"


def read_bytes(path: str | os.PathLike, cap: int, error: type[FasttuneError] = FasttuneError) -> bytes:
    path = Path(path)
    check_regular(path, error, cap)
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew after the stat
        raise error(_too_large(path, f"more than {cap}", cap))
    return data


def read_text(path: str | os.PathLike, cap: int, error: type[FasttuneError] = FasttuneError) -> str:
    """UTF-8 text of at most `cap` bytes."""
    data = read_bytes(path, cap, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{_name(Path(path))}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, cap: int = JSON_CAP, error: type[FasttuneError] = FasttuneError):
    """The JSON value of a file of at most `cap` bytes (any JSON type: callers check the shape)."""
    text = read_text(path, cap, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # e.g. 100,000 nested lists
        raise error(f"{path}: JSON nested too deeply to read") from None


__all__ = [
    "CONFIG_CAP",
    "JSON_CAP",
    "TEMPLATE_CAP",
    "TOKENIZER_JSON_CAP",
    "check_regular",
    "read_bytes",
    "read_json",
    "read_text",
]
