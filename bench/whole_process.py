"""What the whole-process benches (bench/sample.py, predict_emotion.py, train_dreambooth.py) share: a command
timed as its own process with its peak memory, set-up run in a child process, the two sides alternating,
and the figures they print.

    setup = in_child("bench.sample:prepare", workdir)             set-up, never in the bench process itself
    t, m = alternate(lambda side, out: commands(...)[side], sides=("ours", "diffusers"), pairs=3, label=case)
    print(summary(case, t, m)); print(table_row(name, t, m))

Medians of wall time, the largest peak RSS; ratios: time theirs / ours (> 1: ours is faster), memory ours /
theirs (< 1: ours is leaner). This machine is shared and noisy: compare only figures from one run.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def in_child(function: str, *args: str):
    """`function(*args)` ("module:name", string arguments) run in a fresh process; its result comes back as
    JSON. Set-up (writing a model, importing torch) runs so, never in the bench process itself: Linux
    counts a parent's peak RSS, copied at fork, in every child's ru_maxrss, so a bench process that had
    imported torch (0.5 GB) or built a model (GBs) would put that floor under every measurement."""
    code = ("import json, sys; from importlib import import_module; module, name = sys.argv[1].split(':'); "
            "print(json.dumps(getattr(import_module(module), name)(*sys.argv[2:])))")
    done = subprocess.run([sys.executable, "-c", code, function, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {function}{args}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def machine() -> dict:
    """Called in the set-up child (`in_child`), so that the bench process never imports torch: which
    precisions this CPU computes in hardware ("native", for `skip_emulated`), and a line saying which CPU
    the figures come from ("cpu": its model name, CPU count, kind as common/precision.cpu_kind names it,
    and torch's threads), which every bench prints first."""
    import torch
    from common.precision import DTYPES, cpu_kind, native_on_cpu
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "a CPU")
    return {"native": {name: native_on_cpu(dtype) for name, dtype in DTYPES.items()},
            "cpu": f"{name}, {os.cpu_count()} CPUs, {cpu_kind()}, torch {torch.__version__} on "
                   f"{torch.get_num_threads()} threads"}


def run(command: list[str], *, stdout: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process, start to exit; its standard output goes to the file
    `stdout` (as a user's `> out.jsonl`), else nowhere."""
    with tempfile.TemporaryFile() as log, open(stdout or os.devnull, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"failed ({status}): {' '.join(command)}\n{log.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 2**20


def skip_emulated(cases: list[str], precision_of: Callable[[str], str], native: dict[str, bool], *,
                  run_anyway: bool, flag: str, reference: str) -> list[str]:
    """The cases to run: those in a precision this CPU computes in hardware (`native`, from
    common/precision.native_on_cpu), or every case when `run_anyway` (the bench's `flag`). On a CPU without
    bf16/fp16 instructions torch emulates them about 100x slower than fp32, which times nothing useful."""
    emulated = [c for c in cases if not native[precision_of(c)]]
    if not emulated or run_anyway:
        return cases
    names = "/".join(sorted({precision_of(c) for c in emulated}))
    print(f"skipping {', '.join(emulated)}: this CPU has no {names} instructions, so torch emulates {names} "
          f"(about 100x slower than fp32, for {reference} as for us); {flag} runs them anyway")
    return [c for c in cases if c not in emulated]


Command = Callable[[str, Path], "tuple[list[str], Path | None]"]   # (side, a fresh folder) -> (argv, stdout file)


def alternate(command: Command, *, sides: tuple[str, str], pairs: int, label: str,
              scratch: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Run the two sides in turn, `pairs` times (the order flips each pair), each in a fresh temporary
    folder (under `scratch`, else the system's), removed after the run. Prints each run; returns the
    median wall time and the largest peak RSS of each side."""
    times, rss = {side: [] for side in sides}, {side: [] for side in sides}
    for pair in range(pairs):
        for side in sides if pair % 2 == 0 else sides[::-1]:
            with tempfile.TemporaryDirectory(dir=scratch) as out:
                argv, stdout = command(side, Path(out))
                seconds, gb = run(argv, stdout=stdout)
            times[side].append(seconds)
            rss[side].append(gb)
            print(f"{label} {side:12s} {seconds:7.1f} s  {gb:5.2f} GB", flush=True)
    return ({side: statistics.median(v) for side, v in times.items()}, {side: max(v) for side, v in rss.items()})


def summary(label: str, t: dict[str, float], m: dict[str, float]) -> str:
    ours, theirs = t
    return (f"{label}: time {ours} {t[ours]:.1f} s, {theirs} {t[theirs]:.1f} s -> {t[theirs] / t[ours]:.2f}x; "
            f"peak RSS {ours} {m[ours]:.2f} GB, {theirs} {m[theirs]:.2f} GB -> {m[ours] / m[theirs]:.2f}")


def table_row(name: str, t: dict[str, float], m: dict[str, float]) -> str:
    """`| name | ours s | theirs s | speed | peak RSS |`, the row of the benches' Markdown tables."""
    ours, theirs = t
    return (f"| {name} | {t[ours]:.1f} s | {t[theirs]:.1f} s | {t[theirs] / t[ours]:.2f}x "
            f"| {m[ours]:.2f} / {m[theirs]:.2f} GB ({m[ours] / m[theirs]:.2f}) |")
