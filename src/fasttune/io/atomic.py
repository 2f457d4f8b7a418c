"""The one atomic file write: a new file is written under a fresh hidden name beside its destination,
flushed to disk, then renamed over it. A reader, or a crash at any instant, sees the old file or the
whole new one, never a part; on an error the temporary file is removed and the old file is untouched.

The temporary file is created with mode 0o666 (O_EXCL), not mkstemp's 0o600, so the final file gets the
permissions the umask gives every other file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_file(path) as f: f.write(...)`: the file appears at `path` when the block ends without
    an error. Text modes write UTF-8 with "\\n" line ends; "wb" writes bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """The whole of `text` at `path`, atomically (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(text)
