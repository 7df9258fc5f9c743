"""Reading checkpoint files and loading them strictly into our modules.

Every model in this project loads public weights the same way:

1. read the tensors (safetensors only here; pickles are refused, see `read_safetensors`),
2. rename the keys with a short list of regex rules written as data next to the model
   (`rename_keys`), so a reader can audit the whole mapping in one screen,
3. load strictly (`load_strict`): a missing, unexpected or mis-shaped tensor stops the load with
   an error that names it. Nothing is ever loaded non-strictly.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match the model. The message names it."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file. Pickle files are refused: unpickling can run code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({path.suffix}) are refused here, because loading a pickle can run "
            f"arbitrary code. Convert it once with `python -m diffusion.checkpoints.convert {path} "
            f"{path.with_suffix('.safetensors')}` (a restricted reader that runs nothing from the file), "
            "or take the model.safetensors that the model's publisher ships.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbage files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


Rule = tuple[str, str]  # (regex matched against the whole source key, replacement with \1 groups)


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule], *,
                drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Rename every key by the first rule whose regex matches it whole.

    Keys matching a `drop` regex are removed (buffers the reference keeps but we recompute, e.g.
    `position_ids`). Keys no rule matches keep their name and so show up as "unexpected" in
    `load_strict`, which is the point: nothing is silently ignored.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = [re.compile(p) for p in drop]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if any(d.fullmatch(key) for d in dropped):
            continue
        new = key
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                new = pattern.sub(repl, key)
                break
        if new in out:
            raise CheckpointError(f"two checkpoint tensors map onto {new!r} (the second is {key!r})")
        out[new] = value
    return out


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], *,
               source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {tuple(got[k])}, model {tuple(expected[k])})"
                       for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                assign: bool = False) -> None:
    """Copy `state_dict` (already in our key names) into `module`, all tensors or none.

    Tensors are cast to each parameter's dtype, so an fp16 file loads into an fp32 model.
    assign=True puts the given tensors in place of the module's (for a module built on the meta
    device, so a large model never exists twice in memory); the caller must not reuse them.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, source=source)
    own = module.state_dict()
    converted = {k: v.to(dtype=own[k].dtype) for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=assign)
