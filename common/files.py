"""Files written so that a crash never leaves a torn one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write `path` so that it is either the old file or the complete new one, never a torn one:
    `write(tmp)` fills a temporary file in the same folder, which is fsynced and then renamed over
    `path` with os.replace (atomic on POSIX and Windows). A crash leaves at most a stray `.tmp` file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path: str | Path, *, error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError):
    """The parsed contents of a JSON file. A file that cannot be read or parsed raises `error` (a
    missing one, `missing`) with a message naming it, never a bare traceback from json."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise missing(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not a readable JSON file ({e})") from None
