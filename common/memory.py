"""Sizes from flags checked against the machine's memory before any work.

A script estimates the memory that its image counts and sizes need (diffusion/pipeline.py's
`sampling_memory` for sampling, dreambooth/data.py for training) and calls `check_memory`, which refuses
the run with one line giving both numbers and the flag to change, instead of letting it run until the
kernel kills it. The estimates are measured upper bounds, not exact figures (docs/reliability.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.flags import UsageError


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None     # cgroup v2 writes "max" for no limit


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation can get on `device` now, or None when the system does not say.

    CUDA: the device's free memory (torch.cuda.mem_get_info). CPU: Linux's MemAvailable (free memory
    plus what the kernel can reclaim, such as the page cache), lowered to the room left under the
    process's cgroup limit when it runs in a container (v2 memory.max, or v1 memory.limit_in_bytes);
    elsewhere the free physical pages."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except OSError:
        pass
    if have is None and hasattr(os, "sysconf"):
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:   # v1 writes a huge number for none
            room = max(0, limit - usage)
            have = room if have is None else min(have, room)
            break
    return have


def training_device(name: str) -> torch.device:
    """The device common.training.setup_distributed picks for a trainer's --device (auto, cpu or cuda), for
    checks before it runs (the first GPU stands for each process's own)."""
    use_cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    return torch.device("cuda" if use_cuda and torch.cuda.is_available() else "cpu")


def check_memory(need: int, *, device: torch.device | str, what: str, advice: str) -> None:
    """Raise UsageError when `need` bytes exceed what `device` has available: `WHAT needs about N GB of
    memory, but the cpu has M GB available; ADVICE`. Nothing is refused where the system does not say."""
    have = available_memory(device)
    if have is not None and need > have:
        raise UsageError(f"{what}: needs about {gb(need)} of memory, but the {torch.device(device).type} has "
                         f"{gb(have)} available; {advice}")


def how_many_fit(fixed: int, each: int, device: torch.device | str) -> int | None:
    """How many items of `each` bytes fit beside `fixed` bytes in the available memory (None: unknown)."""
    have = available_memory(device)
    return None if have is None else max(0, (have - fixed) // max(1, each))
