"""Files: written so that a crash never leaves a torn one, temporaries of a crashed write found again,
output folders checked before any work, and JSON read with errors that name the file."""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
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
        # mkstemp makes 0600; the file gets what open() would give it. Set after `write`, which may have
        # replaced the temporary with a new file of its own (safetensors' save_file does: 0600 again).
        os.chmod(tmp, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)   # elsewhere: set and restore (not thread-safe, but done once per write)
    os.umask(mask)
    return mask


TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")   # what atomic_write's mkstemp names its files


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries an interrupted `atomic_write` left in `folder` (a crash mid-write can
    leave gigabytes at SD scale); returns what was removed, so the caller can say so. Call it only
    where no other process of the run is writing (at the start of a run, on the main process)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.is_file() and TEMPORARY.fullmatch(p.name))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# Tries of check_writable's proof: "no such file" may be another process (a rank of the same DDP run) removing
# the folder it made for its own proof; a path that truly cannot be made says so every time.
PROOF_ATTEMPTS = 20


def check_writable(folder: str | Path, flag: str) -> None:
    """Prove that `folder` can be created (if needed) and written, and leave the file system as it was: the
    folders made for the proof are removed again, so a run that stops at a later check leaves nothing.
    A ValueError naming the flag otherwise (a path that is a file, one under a file or a device, a
    read-only folder, no permission, a name too long). Several processes may prove the same folder at once
    (the ranks of a DDP run): a folder that vanishes under the proof is proved again."""
    folder = Path(folder)
    if "\x00" in str(folder):
        raise ValueError(f"{flag} {str(folder)!r}: a path cannot hold a NUL character")
    for attempt in range(PROOF_ATTEMPTS):
        made = []                                                  # the folders this try made, root first
        try:
            for path in reversed([folder, *folder.parents]):
                try:
                    path.mkdir()
                    made.append(path)
                except FileExistsError:
                    if path.is_symlink() and not path.exists():
                        raise ValueError(f"{flag} {folder}: cannot write there: {path} is a link to nothing") from None
                    if not stat.S_ISDIR(path.stat().st_mode):   # FileNotFoundError if it vanished meanwhile
                        where = "it is a file" if path == folder else f"it is under {path}, which is a file"
                        raise ValueError(f"{flag} {folder}: cannot write there: {where}, not a folder") from None
            with tempfile.TemporaryFile(dir=folder):
                pass
            return
        except FileNotFoundError as e:
            if attempt == PROOF_ATTEMPTS - 1:
                raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None
        except OSError as e:
            raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None
        finally:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()


def config_from_json(path: str | Path, build: Callable):
    """build(the file's JSON): a config object, with any error in the file (unreadable, or a value the
    config refuses) raised as a ValueError that names the file."""
    config = read_json(path)
    try:
        return build(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


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


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB pieces): what a run record names an input file by."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
