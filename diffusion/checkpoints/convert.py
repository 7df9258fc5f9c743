"""Convert a `.ckpt`/`.pt` checkpoint to `.safetensors` once, so no pickle is ever opened again.

    python -m diffusion.checkpoints.convert IN.ckpt OUT.safetensors [--half] [--keep_ema] [--inert module.Name ...]

The input is read by `diffusion.checkpoints.ckpt.read_checkpoint`, which runs nothing from the file (see there).
Only the model tensors are written (Lightning's `state_dict`; optimizer states, callbacks and the
like are left behind). Stable Diffusion's "full-ema" files carry a second copy of the UNet under
`model_ema.*` (names without dots, plus `model_ema.decay` and `model_ema.num_updates`); it is
dropped unless `--keep_ema`. `--half` stores every floating-point tensor but 0-dim scalars as
float16, halving the file; that includes the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...),
which our loader ignores (sampling recomputes the schedule from its config). The write is atomic: a temporary file in the same
folder, fsync, then `os.replace` (`common.state_dict.write_safetensors`), so an interrupted run never
leaves a half-written OUT; and the same input gives the same bytes (the metadata sorted).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

from common.state_dict import CheckpointError, write_safetensors
from diffusion.checkpoints.ckpt import read_checkpoint_full, state_dict_of

EMA_PREFIX = "model_ema."


def select_tensors(tensors: Mapping[str, torch.Tensor], *, half: bool, keep_ema: bool,
                   source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors to write: EMA copies dropped unless `keep_ema`, floats cast to fp16 if `half`
    (except 0-dim scalars such as `model_ema.decay`: 0.9999 would round to 1.0 in float16).

    Every returned tensor is contiguous and owns its memory (safetensors refuses shared storage).
    Never modifies the caller's tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(EMA_PREFIX) and not keep_ema:
            continue
        if half and value.is_floating_point() and value.dtype != torch.float16 and value.dim() > 0:
            cast = value.to(torch.float16)
            if bool(torch.isfinite(value).all()) and not bool(torch.isfinite(cast).all()):
                raise CheckpointError(f"{source}: tensor {key!r} overflows float16 (|max| = "
                                      f"{value.abs().max().item():.3g}); convert without --half")
            value = cast
        out[key] = value.contiguous()
    return _own_memory(out)


def _own_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share a storage with another tensor or view part of a larger one."""
    users: dict[int, int] = {}
    for value in tensors.values():
        ptr = value.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    out = {}
    for key, value in tensors.items():
        storage = value.untyped_storage()
        whole = value.storage_offset() == 0 and value.numel() * value.element_size() == storage.nbytes()
        out[key] = value if users[storage.data_ptr()] == 1 and whole else value.clone()
    return out


def convert(src: str | Path, dst: str | Path, *, half: bool = False, keep_ema: bool = False,
            inert: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read `src` safely, write its model tensors to the safetensors file `dst`.

    Returns the tensors written and the names of those left out (the EMA copies).
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the output must end in .safetensors")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output would overwrite the input")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst}: folder {dst.parent} does not exist")
    tree = read_checkpoint_full(src, inert=inert)
    state_dict = state_dict_of(tree, source=src)
    tensors = select_tensors(state_dict, half=half, keep_ema=keep_ema, source=src)
    metadata = {"format": "pt", "converted_from": src.name}
    if isinstance(tree, dict):  # Lightning's bookkeeping, kept as text for the curious
        for key in ("epoch", "global_step", "pytorch-lightning_version"):
            if isinstance(tree.get(key), (int, str)):
                metadata[key] = str(tree[key])
    write_safetensors(dst, tensors, metadata)
    return tensors, [key for key in state_dict if key not in tensors]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.checkpoints.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="IN", help="a .ckpt/.pt/.pth/.bin (or .safetensors) checkpoint")
    parser.add_argument("dst", metavar="OUT", help="the .safetensors file to write")
    parser.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    parser.add_argument("--keep_ema", action="store_true", help=f"keep the EMA copies ({EMA_PREFIX}*)")
    parser.add_argument("--inert", action="append", default=[], metavar="module.Name",
                        help="read this extra pickled class as an inert placeholder (runs nothing); repeatable")
    args = parser.parse_args(argv)
    try:
        tensors, dropped = convert(args.src, args.dst, half=args.half, keep_ema=args.keep_ema, inert=args.inert)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a full disk while writing: OUT is untouched (atomic write)
        print(f"error: {args.dst}: could not write it ({e}); nothing was changed", file=sys.stderr)
        return 1
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {args.dst}: {len(tensors)} tensors, {size / 2**20:.1f} MiB"
          + (f"; left out {len(dropped)} EMA tensors ({EMA_PREFIX}*, --keep_ema keeps them)" if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
