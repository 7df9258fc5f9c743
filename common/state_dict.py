"""Reading checkpoint files and loading them strictly into our modules.

Every model in this project loads public weights the same way:

1. read the tensors (safetensors only here; pickles are refused, see `read_safetensors`),
2. rename the keys by a table written as data next to the model (`KeyTable`, `rename`): rows of
   (our name, the checkpoint's name) with fields such as `{i}` for a block index, read in both
   directions (saving is the same table backwards), so a reader can audit a whole mapping in one screen,
3. load strictly (`load_strict`): a missing, unexpected or mis-shaped tensor stops the load with
   an error that names it. Nothing is ever loaded non-strictly.

Weights holding NaN or infinity are refused by `check_finite`, the one finiteness check of every
tensor file read here: `load_strict` runs it on every model, LoRA files run it on read
(diffusion/checkpoints/lora_files.py), and any other weights file (a textual-inversion embedding, say)
should call it where it is read.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match the model. The message names it."""


# safetensors' dtype names -> torch dtypes (the format: https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20   # safetensors' own reader refuses larger headers too


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints ({path.suffix}) are refused here, because loading a pickle can run "
            f"arbitrary code. Convert it once with `python -m diffusion.checkpoints.convert {path} "
            f"{path.with_suffix('.safetensors')}` (a restricted reader that runs nothing from the file), "
            "or take the model.safetensors that the model's publisher ships.")


def safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, where the data starts) of a .safetensors file, every entry checked
    against the file's size, so a truncated file is named with its first incomplete tensor here
    and not met later as a crash. The format: 8 bytes little-endian N, N bytes of JSON
    {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
    then the data, each tensor's bytes row-major at [start + begin, start + end)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():   # open() would fail on a folder, and read nothing sensible from a device or a pipe
        raise CheckpointError(f"{path}: " + ("is a folder" if path.is_dir() else "is not a regular file (a device, a "
                                             "pipe or a socket)") + ", not a .safetensors file")
    _refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a readable safetensors file (no valid header: {size} bytes, "
                                  f"header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape, (begin, end) = [int(d) for d in entry["shape"]], entry["data_offsets"]
            expected = math.prod(shape) * dtype.itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name}: unreadable header entry {entry!r} ({e!r})") from None
        if end - begin != expected or begin < 0 or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: tensor {name}: {end - begin} bytes for shape {tuple(shape)} of "
                                  f"{entry['dtype']} ({expected} expected)")
        if start + end > size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file ({start + end} > {size} "
                                  "bytes): the file is truncated")
    return header, metadata, start


def read_safetensors(path: str | Path, *, dtype: torch.dtype | None = None,
                     keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file (those whose name `keys` accepts, when given), or of a sharded
    checkpoint read as one through its index (`model.safetensors.index.json`: see `read_index`).

    Without copies: every tensor is a view of its own stretch of the file mapped into memory
    (copy-on-write, so writing to a tensor never touches the file), and a page is read from disk only
    when something first uses it. A 3.4 GB UNet "loads" in milliseconds and its memory is the file's
    pages (see load_strict). One mapping per tensor, so a tensor replaced later (a layout change, a
    cast) gives its pages back at once.
    With `dtype`, floating tensors of another dtype are converted one by one, each mapping let go
    once converted, so an fp32 file loads as bf16 holding only the bf16 tensors (and one fp32 tensor
    at a time). Pickle files are refused: unpickling can run code."""
    path = Path(path)
    if path.name.endswith(".json"):          # an index: its shards, each on its own pages
        out = {}
        for shard, names in read_index(path).items():
            out.update(check_shard(shard, names, read_safetensors(shard, dtype=dtype, keys=keys), keys=keys))
        return out
    header, _, start = safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name in (name for name in header if keys is None or keys(name)):
            entry = header[name]
            stored, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
            begin, end = (start + o for o in entry["data_offsets"])
            if begin == end:
                tensor = torch.empty(shape, dtype=stored)
            elif begin % stored.itemsize:          # misaligned for a view of its dtype: read into memory
                buffer = bytearray(end - begin)
                f.seek(begin)
                f.readinto(buffer)
                tensor = torch.frombuffer(buffer, dtype=stored).view(shape)
            else:                                  # a view of the pages [first, end) of the file
                first = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
                pages = mmap.mmap(f.fileno(), end - first, access=mmap.ACCESS_COPY, offset=first)
                tensor = torch.frombuffer(pages, dtype=stored, count=(end - begin) // stored.itemsize,
                                          offset=begin - first).view(shape)
            out[name] = tensor.to(dtype) if dtype is not None and stored.is_floating_point else tensor
    return out


# ---- sharded checkpoints and the files of a model folder ----------------------------------------------------
def read_index(path: str | Path) -> dict[Path, set[str]]:
    """A sharded checkpoint's index (`model.safetensors.index.json`, `diffusion_pytorch_model.safetensors.index.json`,
    `pytorch_model.bin.index.json`, as transformers and diffusers write it: {"metadata": ..., "weight_map":
    {tensor name: shard file name}}) as {shard path: the names it holds}. Shards sit beside the index, named
    without any folder (so an index never reaches outside its folder)."""
    from common.files import read_json

    path = Path(path)
    index = read_json(path, error=CheckpointError, missing=CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: not a sharded-checkpoint index (no weight_map of tensor names to shard files)")
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path}: tensor {name}: shard {shard!r} is not a file name beside the index")
        shards.setdefault(path.parent / shard, set()).add(name)
    for shard in shards:
        if not shard.exists():
            raise CheckpointError(f"{shard}: no such file (a shard that {path.name} names)")
    return dict(sorted(shards.items()))


def check_shard(shard: Path, names: set[str], tensors: dict[str, torch.Tensor], *,
                keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """A shard's tensors (those `keys` accepts), checked against the names its index gives it."""
    wanted = names if keys is None else {n for n in names if keys(n)}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - names)
    if missing or extra:
        raise CheckpointError(f"{shard}: does not hold what its index says: "
                              + "; ".join([f"missing {len(missing)}: {listing(missing, 5)}"] * bool(missing)
                                          + [f"not in the index for it {len(extra)}: {listing(extra, 5)}"] * bool(extra)))
    return tensors


# The weights files of the two public folder layouts, as their libraries name them: (safetensors, pickle).
WEIGHTS_NAMES = {"transformers": ("model.safetensors", "pytorch_model.bin"),
                 "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")}


def variant_name(name: str, variant: str | None) -> str:
    """model.safetensors -> model.fp16.safetensors, model.safetensors.index.json -> model.safetensors.index.fp16.json
    (the variant before the last suffix, as transformers' and diffusers' `_add_variant`)."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def find_weights(folder: str | Path, layout: str, *, variant: str | None = None) -> Path:
    """The weights of one model folder (`layout`: "transformers" or "diffusers", see WEIGHTS_NAMES), looked for
    as transformers and diffusers look: one safetensors file, a safetensors index of shards, then the pickles
    (a .bin, a .bin index), each with `variant` in its name when given (no fallback to the plain name: a
    pipeline decides per component, see diffusion/checkpoints/load.py). A pickle is read by the restricted
    unpickler (diffusion/checkpoints/ckpt.py `read_weights`)."""
    from common.hub_cache import cache_hint

    folder = Path(folder)
    safetensors, pickle = WEIGHTS_NAMES[layout]
    names = [variant_name(n, variant) for n in (safetensors, safetensors + ".index.json", pickle, pickle + ".index.json")]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no {names[0]} in this folder (nor {', '.join(names[1:])}; found: "
                          f"{', '.join(found) or 'nothing'}){cache_hint(folder)}")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    return safetensors_header(path)[1]


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> None:
    """Write a .safetensors file atomically (common/files.py), its bytes a function of its contents alone:
    safetensors passes the metadata through a hash map, in a new order each run, so the header is then
    rewritten in place with the metadata sorted (the same length, as safetensors pads it; nothing else moves)."""
    from safetensors.torch import save_file

    from common.files import atomic_write

    def write(tmp: str) -> None:
        save_file(dict(tensors), tmp, metadata=metadata)
        if not metadata:
            return
        with open(tmp, "r+b") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()   # as safetensors writes
            assert len(text) <= n, "the same entries in another order are never longer"
            f.seek(8)
            f.write(text.ljust(n))
    atomic_write(Path(path), write)


# ---- key tables: one checkpoint layout's names for our tensors, as data read in both directions ----
# A template is a key with fields in braces; each field matches a fixed vocabulary.
FIELDS = {
    "i": r"\d+",                    # an index: a layer, a block, a resolution level
    "j": r"\d+",                    # a second index (a ResNet within a level)
    "w": r"weight|bias",
    "coder": r"encoder|decoder",    # the VAE's two halves, named alike inside
    "rest": r".+",                  # the rest of the key: a submodule whose inner names agree in both layouts
}


def _fields(template: str) -> list[str]:
    fields = re.findall(r"\{(\w+)\}", template)
    for field in fields:
        if field not in FIELDS:
            raise ValueError(f"template {template!r}: unknown field {{{field}}} (fields: {', '.join(FIELDS)})")
    return fields


@functools.lru_cache(maxsize=None)   # a table's templates are compiled once, when first used
def _pattern(template: str) -> re.Pattern:
    r"""A template as a regex: "blocks.{i}.norm1.{w}" -> blocks\.(?P<i>\d+)\.norm1\.(?P<w>weight|bias)."""
    pieces = re.split(r"\{(\w+)\}", template)          # literal, field, literal, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{FIELDS[p]})" for k, p in enumerate(pieces)))


class KeyTable:
    """How one checkpoint layout names our tensors: rows of (our template, the checkpoint's template),
    and the checkpoint's templates of tensors it holds that we do not load (`drop`: buffers we recompute,
    modules we do not use).

    A row holds the same fields on both sides, so it reads both ways: loading renames the checkpoint's
    keys to ours, saving ours to the checkpoint's. The first row that matches a key whole renames it,
    so a specific row goes before a general one (`...nin_shortcut.{rest}` before `...{rest}`).
    """

    def __init__(self, rows: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()):
        self.rows = list(rows)
        self.drop = list(drop)
        for ours, theirs in self.rows:
            if sorted(_fields(ours)) != sorted(_fields(theirs)):
                raise ValueError(f"row ({ours!r}, {theirs!r}): the two sides must hold the same fields")
        for template in self.drop:
            _fields(template)

    def name(self, key: str, *, reverse: bool = False) -> str | None:
        """The checkpoint's key under our name (with reverse=True, ours under the checkpoint's), or
        None when no row matches it."""
        for ours, theirs in self.rows:
            source, target = (ours, theirs) if reverse else (theirs, ours)
            match = _pattern(source).fullmatch(key)
            if match:
                return target.format(**match.groupdict())
        return None

    def drops(self, key: str) -> bool:
        return any(_pattern(template).fullmatch(key) for template in self.drop)


def rename(state_dict: Mapping[str, torch.Tensor], table: KeyTable, *,
           reverse: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (with reverse=True, ours under the checkpoint's).

    Loading leaves out the keys that the table drops. Keys no row matches keep their name and so
    show up as "unexpected" in `load_strict`, which is the point: nothing is silently ignored.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not reverse and table.drops(key):
            continue
        new = table.name(key, reverse=reverse) or key
        if new in out:
            raise CheckpointError(f"two checkpoint tensors map onto {new!r} (the second is {key!r})")
        out[new] = value
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse floating tensors holding NaN or infinity (a diverged run's save, a corrupted or crafted file):
    everything computed from them would be NaN, a black image or a NaN score. Raises CheckpointError naming
    `source` and the first such tensor (in the mapping's order) with its counts.

    One fast pass per tensor: NaN and infinity survive a sum, so a finite float32 sum proves the tensor
    finite; only a sum that is not finite (a bad tensor, or finite values whose sum overflows) is counted
    element by element. Measured on one CPU thread, alternating with `torch.isfinite(t).all()` in one
    process: 0.04 s against 1.25 s for 800 MB of fp32 (about 20 GB/s, so about 0.2 s for SD v1's weights)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
            continue
        if torch.isfinite(tensor.sum(dtype=torch.float32)):
            continue
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        if nan or inf:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"{source}: tensor {name} holds non-finite values ({nan} NaN, {inf} infinite of "
                                  f"{tensor.numel()}, as {dtype}); refused, since every output computed from "
                                  "it would be NaN (a black image, a NaN score)")


def listing(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, comma-separated, and how many more there are: for error messages."""
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
        problems.append(f"missing {len(missing)}: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))


@contextlib.contextmanager
def empty_model() -> Iterator[None]:
    """Build a model with no memory and no initialisation, to be filled by `load_strict`:

        with empty_model():
            unet = UNet2DConditionModel(config=config)     # every tensor on the meta device

    The meta device allocates nothing; the initialisers are skipped too (as transformers'
    `no_init_weights`), because torch runs some of them on meta tensors through its Python reference
    kernels, whose first use imports torch._dynamo: 1.7 s, for a CLIP embedding's normal_."""
    names = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                dtype: torch.dtype | None = None) -> None:
    """Put `state_dict` (already in our key names) into `module`, all tensors or none.

    A module built on the meta device (`with empty_model(): Model(config)`, which allocates nothing
    and runs no initialisation) takes the given tensors themselves as its parameters, so a
    model read by `read_safetensors` stays on the file's pages and never exists twice in memory; the
    caller must not reuse the tensors. A module with real tensors gets copies. Floating tensors are
    cast to `dtype` (default: the module's own dtype for that tensor), a copy only where it differs.
    Tensors holding NaN or infinity in that dtype are refused (`check_finite`), naming the first.
    """
    own = module.state_dict()
    check_keys({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state_dict.items()},
               source=source)
    converted = {k: v.to(dtype=dtype or own[k].dtype) if v.is_floating_point() else v
                 for k, v in state_dict.items()}
    check_finite(converted, source=source)
    on_meta = any(v.is_meta for v in own.values())
    module.load_state_dict(converted, strict=True, assign=on_meta)
