"""A user's bad value becomes one line before any work, never a traceback from deep inside a run.

Every script checks its flags before it loads a model or writes a file, with the checks below and its
own; a check raises UsageError with a message that names the flag and the value. The script turns it
into one line on stderr, `PROG: error: MESSAGE`, and exit status 2 (argparse's own form and status for
its errors), in one place: `exit_usage`.

    try:
        check_seed(args.seed, count=args.n_iter)
        prompts = read_lines(args.from_file, "--from-file")
    except UsageError as e:
        exit_usage("sample.py", e)

The other shared checks: `common.run_config.finite_float` (an argparse type refusing nan/inf),
`common.files.check_writable` (an output folder), `common.memory.check_memory` (sizes against the
machine's memory).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

# torch.Generator.manual_seed takes any integer in [-2^63, 2^64 - 1] (a signed or unsigned 64-bit value);
# beyond it, "Overflow when unpacking long long".
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


class UsageError(ValueError):
    """A bad command-line value (or a file named by one); the message names the flag and the value."""


class UsageExit(SystemExit):
    """SystemExit (argparse's status 2 for a bad value) whose str() is the message, so a caller (a test)
    can read it."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_usage(prog: str, error: Exception | str, *, status: int = 2) -> NoReturn:
    """Print `PROG: error: MESSAGE` on stderr and exit with `status` (2: a bad value; 1: a run that
    could not go on, such as weights that compute NaN)."""
    message = f"{prog}: error: {error}"
    print(message, file=sys.stderr)
    raise UsageExit(message, status)


def check_seed(seed: int, *, flag: str = "--seed", count: int = 1, low: int = SEED_MIN,
               high: int = SEED_MAX) -> None:
    """`seed` .. `seed + count - 1` (a script that seeds batch k with seed + k) must be seeds torch takes.
    `low` and `high` narrow the range: 0 where numpy's SeedSequence needs a non-negative seed, less than
    SEED_MAX where seed + an index (an epoch, a class image) must stay a seed too."""
    if not low <= seed <= high - (count - 1):
        top = high - (count - 1)
        uses = f" (--seed + {count - 1} seeds the last batch)" if count > 1 else ""
        raise UsageError(f"{flag} {seed}: must be an integer from {low} to {top}{uses}, within the range of a "
                         "torch generator's seed")


def check_device(name: str | None, flag: str = "--device"):
    """--device: cpu, or cuda / cuda:N with such a GPU here (None: cuda if available, else cpu). Returns the
    torch.device; a UsageError names the flag for anything else (an unknown name, meta, a missing GPU)."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name}: must be cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: must be cpu or cuda (cuda:N for the N-th GPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA device(s) here")
    return device


def read_lines(path: str | Path, flag: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (a list of prompts), stripped. A missing file, a folder,
    one that cannot be read or is not text is a UsageError naming the flag and the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file" if not path.exists() else \
            "is not a regular file"
        raise UsageError(f"{flag} {path}: {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {path}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); give one prompt per line") from None
    if "\x00" in text:
        raise UsageError(f"{flag} {path}: not a text file (it holds NUL bytes); give one prompt per line")
    return [line.strip() for line in text.splitlines() if line.strip()]
