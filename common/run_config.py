"""Run configs: `--config FILE.toml` for any argparse script, and a record of every run.

A config file is flat TOML whose keys are the script's flag names without the dashes:

    learning_rate = 3e-4        # values have the flag's type: int, float, string, true/false
    mixed_precision = "bf16"

Flags given on the command line override the file. An unknown key, a table, or a value of the wrong
type stops the script before any work, with the file, line and key named. Each run writes into its
output folder `run_config.toml` (every flag, defaults included; `--config` of that file repeats the run)
and `run_info.json` (command line, times, git commit, versions, device, dtype, world size).

Only the standard library: `tomllib` reads TOML; the few lines in `to_toml` write the flat subset used.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write

SKIPPED_IN_RECORD = ("config",)   # `--config` names the file that was read, not a setting of the run


FLOAT32_MAX = float(torch.finfo(torch.float32).max)   # 3.4e38: such numbers meet float32 tensors


def finite_float(text: str) -> float:
    """argparse type of a number flag that must be finite (a learning rate, a guidance scale, ...):
    'nan' and 'inf' are refused by name before any work, as any other bad value, and so is a number
    beyond float32's range (1e308 is finite in Python and infinite in a float32 tensor)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is beyond float32's range (+-{FLOAT32_MAX:.1e}), the dtype it "
                                         "is computed in")
    return value


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """flag name without dashes -> its action, for every --long option except --help and --config."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and action.dest not in ("help", *SKIPPED_IN_RECORD):
                out[option[2:]] = action
    return out


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(\[\s*)?[\"']?{re.escape(key)}[\"']?\s*[=\]]")  # `key =` or `[key]`
    return next((n for n, line in enumerate(text.splitlines(), 1) if pattern.match(line)), None)


def _type_name(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    return {int: "an integer", float: "a number", finite_float: "a finite number"}.get(action.type, "a string")


def _check_one(value, action: argparse.Action):
    """The value converted to what argparse would store, or a ValueError saying what was expected.
    A repeatable flag (action="append", e.g. sample.py --lora) takes a list of such values."""
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ValueError(f"expected a list (the flag repeats), got {value!r}")
        return [_check_scalar(v, action) for v in value]
    return _check_scalar(value, action)


def _check_scalar(value, action: argparse.Action):
    if action.nargs == 0:                                     # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value                                          # the value stored, as --flag would store it
    if isinstance(value, bool) or isinstance(value, (dict, list)) or value is None:
        raise ValueError(f"expected {_type_name(action)}, got {json.dumps(value)}")
    if action.type is int:
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
    elif action.type in (float, finite_float):
        if not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        value = float(value)
        if action.type is finite_float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ValueError(f"expected a finite number within float32's range, got {value!r}")
    elif not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    elif action.type is not None and action.type is not str:
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def read_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The settings in a TOML config, checked against the parser's flags; errors name file/line/key."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        parser.error(f"--config {path}: cannot read ({e.strerror or e})")
    except UnicodeDecodeError as e:
        parser.error(f"--config {path}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                     "a run config is TOML, `flag = value` lines")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--config {path}: not valid TOML ({e})")
    except RecursionError:
        parser.error(f"--config {path}: nested too deeply to read (config files are flat: `flag = value` lines)")
    flags, values = _flags(parser), {}
    for key, value in data.items():
        where = f"{path}, line {_line_of(text, key) or '?'}"
        if isinstance(value, dict):
            parser.error(f"{where}: [{key}] is a table; config files are flat, one `flag = value` per line")
        if key not in flags:
            close = difflib.get_close_matches(key, list(flags), n=1)
            parser.error(f"{where}: unknown key {key!r}, not a flag of {parser.prog}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
        try:
            values[flags[key].dest] = _check_one(value, flags[key])
        except (ValueError, TypeError) as e:
            parser.error(f"{where}: key {key!r}: {e}")
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv, taking defaults from `--config FILE.toml` first, so command-line flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config(known.config, parser))
    return parser.parse_args(argv)


# ---- writing ----------------------------------------------------------------------------------------
def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)                     # shortest string that reads back to the same float
    if isinstance(value, str):                 # JSON string escapes are valid TOML basic-string escapes
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def to_toml(args: argparse.Namespace, parser: argparse.ArgumentParser, *, header: str = "") -> str:
    """Every flag of `parser` with its value in `args`, one per line, with the flag's help as a comment.
    Unset flags (None) are written as comments: TOML has no null, and absent means the default."""
    lines = [f"# {line}" for line in header.splitlines()]
    written = set()
    for name, action in _flags(parser).items():
        if action.dest in written:                 # a flag with two spellings: write it once
            continue
        written.add(action.dest)
        value = getattr(args, action.dest)
        if action.help:
            lines.append(f"# {action.help}")
        lines.append(f"# {name} =   (not set)" if value is None else f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def git_commit(folder: str | Path) -> str | None:
    """The checked-out commit of the repository holding `folder` (with "-dirty" when files changed)."""
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=folder, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def start_run_record(output_dir: str | Path, args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                     device: str, dtype: str, world_size: int, argv: list[str] | None = None, **extra) -> dict:
    """Write run_config.toml and run_info.json into output_dir; returns the info for `finish_run_record`.
    `extra` (JSON-able) goes into run_info.json as it is."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = to_toml(args, parser, header=f"{parser.prog}: the fully resolved settings of this run.\n"
                                        f"Repeat it with: python {parser.prog} --config run_config.toml")
    atomic_write(output_dir / "run_config.toml", lambda p: Path(p).write_text(text))
    argv = sys.argv[1:] if argv is None else argv
    info = {
        "command": shlex.join([sys.executable, parser.prog, *argv]), "argv": list(argv),
        "start_time": _now(), "end_time": None, "status": "running",
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "device": device, "dtype": dtype, "world_size": world_size, **extra,
    }
    _write_info(output_dir, info)
    return info


def finish_run_record(output_dir: str | Path, info: dict, *, status: str = "finished", **extra) -> None:
    _write_info(Path(output_dir), {**info, **extra, "end_time": _now(), "status": status})


def _write_info(output_dir: Path, info: dict) -> None:
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(output_dir / "run_info.json", lambda p: Path(p).write_text(text))


# ---- resume compatibility -----------------------------------------------------------------------------
def config_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """Lines "key: checkpoint X, now Y" for the run-shaping settings that differ. A setting the checkpoint
    does not record (it was written before the setting existed) is not compared."""
    return [f"  {k}: checkpoint {saved[k]!r}, now {current.get(k)!r}"
            for k in keys if k in saved and saved[k] != current.get(k)]


def check_resume_config(saved: dict, current: dict, keys: tuple[str, ...], *, checkpoint: str | Path,
                        allow_change: bool) -> list[str]:
    """Stop with the list of differences unless allow_change; returns them (to print as a warning)."""
    diffs = config_differences(saved, current, keys)
    if diffs and not allow_change:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: this run's settings differ from the "
                         "checkpoint's:\n" + "\n".join(diffs) +
                         "\nResume with the checkpoint's settings, or pass --allow_config_change to go on anyway.")
    return diffs
