"""Reading PyTorch `.ckpt`/`.pt` checkpoints without ever running code from them.

The problem. A `.ckpt` is a zip archive holding one pickle (`<name>/data.pkl`) plus the raw bytes of
every tensor storage (`<name>/data/<key>`). A pickle is a program for a small stack machine: its
GLOBAL opcode names any importable Python object (`os.system`, `builtins.exec`, ...) and its REDUCE
opcode calls it with arguments from the stack. `torch.load(weights_only=False)` on a downloaded file
therefore runs whatever the file says. `torch.load(weights_only=True)` is safe but refuses the
Lightning checkpoints that Stable Diffusion v1 was published in, because they also pickle training
state such as `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.

The choice. We read the zip ourselves and run the pickle through `pickle.Unpickler` with the two
hooks through which a pickle reaches Python code replaced by our own:

* `find_class(module, name)` looks the name up in `ALLOWED` (diffusion/checkpoints/pickle_allowlist.py), a table, and
  returns *our* function for it (tensor rebuilding, OrderedDict, a numpy scalar, ...), or a fresh
  inert placeholder class for the short list of known training-state classes (`INERT_CLASSES`). It
  never imports anything. Every other name raises `UnsafeCheckpointError`, naming the global.
* `persistent_load(pid)` turns torch's `('storage', <type>, key, location, numel)` records into
  tensors read from the zip's `data/<key>` bytes.

We did not build on `torch.load(weights_only=True)` plus `torch.serialization.add_safe_globals`:
that would hand the unpickler the real Lightning classes (which must then be installed, and whose
`__setstate__` is Lightning code), and the safety argument would live in torch internals that change
between versions. Here the whole argument fits on one screen:

Why nothing in the file is ever executed. The pickle machine calls Python code only
 1. through `find_class` (opcodes GLOBAL, STACK_GLOBAL, INST, OBJ and the extension codes EXT1/2/4),
    answered from `ALLOWED` or refused. CPython answers an extension code from a process-wide cache
    without asking `find_class`, so a pickle containing EXT opcodes is refused before it is run
    (`pickletools.genops` only parses);
 2. through `persistent_load`, which is ours and only reads bytes;
 3. by calling methods of objects already on its stack: `__setstate__` or `setattr` (BUILD), `append`
    and `extend` (APPEND/APPENDS), `__setitem__` (SETITEM/SETITEMS), `add` (ADDITEMS), `__hash__` and
    `__eq__` of dict keys, and whatever the builtin constructors in the table call (`str(x)` calls
    `x.__repr__`, `list(x)` iterates x). The stack holds only pickle's own data (numbers, strings,
    bytes, tuples, lists, dicts, sets) and what our table returned: tensors, OrderedDicts, numpy
    scalars, pure (filesystem-free) paths, torch dtypes, builtin types and our placeholders. Their
    methods belong to Python, numpy, torch or this package, never to the file being read. The callables
    in the table are frozen (`_Frozen` refuses attribute writes) and the placeholder classes are made
    afresh for each file, so a BUILD cannot tamper with a later load; the tensors handed out are
    detached, so nothing a BUILD set on them (`requires_grad`, hooks) comes along.

Not covered: the pre-1.6 non-zip torch format (refused with a clear error; `torch.load(path,
weights_only=True)` reads such files safely when they hold only tensors), and resource exhaustion (a
hostile pickle can still ask for a huge list; it cannot run code).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from common.state_dict import CheckpointError, check_shard, read_index, read_safetensors
from diffusion.checkpoints.pickle_allowlist import (ALLOWED, CODE_RUNNING, INERT_CLASSES, InertObject, StorageType,
                                       placeholder_class)

__all__ = ["read_checkpoint", "read_checkpoint_full", "read_weights", "state_dict_of", "UnsafeCheckpointError", "InertObject",
           "INERT_CLASSES", "PICKLE_CHECKPOINT_SUFFIXES"]

PICKLE_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class UnsafeCheckpointError(CheckpointError):
    """The pickle asked for a global that is not on the allowlist. Nothing from the file was run."""


def _refusal(path: Path, global_name: str) -> UnsafeCheckpointError:
    head = (f"{path}: refused to unpickle the global {global_name!r}: it is not on the allowlist of tensor "
            f"rebuilders, plain containers and inert training-state classes (diffusion/checkpoints/pickle_allowlist.py). "
            f"Nothing from the file was run. ")
    if global_name.startswith(CODE_RUNNING):
        return UnsafeCheckpointError(head + f"{global_name!r} is how a pickle runs code: the file is malicious "
                                     "or corrupt; do not use it. Get a .safetensors file from the publisher.")
    return UnsafeCheckpointError(
        head + "If it is harmless training state (say a Lightning callback) and you trust the file, convert "
        "the file once to safetensors, reading that class as an inert placeholder (still running nothing): "
        f"`python -m diffusion.checkpoints.convert {path} OUT.safetensors --inert {global_name}`; then use OUT.safetensors.")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, path: Path, storages: Callable[[str, StorageType, int], torch.Tensor],
                 inert: Iterable[str]) -> None:
        super().__init__(io.BytesIO(data))
        self._path, self._storages = path, storages
        self._inert = set(INERT_CLASSES) | set(inert)
        self._placeholders: dict[str, type] = {}  # fresh per file

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell some Python 3 names the Python 2 way (`__builtin__.long` for int);
        # translate them with the same tables pickle's own find_class uses. A lookup, not an import.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        global_name = f"{module}.{name}"
        if global_name in self._inert:
            if global_name not in self._placeholders:
                self._placeholders[global_name] = placeholder_class(global_name)
            return self._placeholders[global_name]
        if global_name in ALLOWED:
            return ALLOWED[global_name]
        raise _refusal(self._path, global_name)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._storages(pid[2], pid[1], pid[4])


# --- the zip archive ----------------------------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length


def _read_member(file: io.BufferedReader, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.Tensor:
    """The bytes of one archive member as a uint8 tensor (writable, owning its memory).

    torch stores storages uncompressed, so we read them at their offset straight into the tensor;
    a CRC of 0 means the writer skipped it (torch's `set_crc32_options(False)`), otherwise it is
    checked, so a corrupted download fails here instead of giving garbage weights.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        return _inflate_bounded(zf, info)
    file.seek(info.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    file.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    buf = torch.empty(info.file_size, dtype=torch.uint8)  # (nbytes,), not zero-filled: read over at once
    if file.readinto(memoryview(buf.numpy())) != info.file_size:
        raise zipfile.BadZipFile(f"{info.filename} is cut short")
    if info.CRC != 0 and zlib.crc32(memoryview(buf.numpy())) != info.CRC:
        raise zipfile.BadZipFile(f"{info.filename} fails its CRC check (corrupt file)")
    return buf


MAX_INFLATED_BYTES = 64 * 2**20   # a compressed metadata member (data.pkl, version) inflates to at most this


def _inflate_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.Tensor:
    """A compressed member, inflated only when it cannot be a zip bomb. torch never compresses tensor
    storage (it lays storages out aligned, to be read in place), so a compressed `data/` member is
    refused before a byte is inflated; other members (a re-zipped data.pkl) inflate to at most
    MAX_INFLATED_BYTES, whatever size their header declares."""
    if "/data/" in info.filename:
        raise zipfile.BadZipFile(f"{info.filename} is compressed ({info.compress_size} bytes said to inflate to "
                                 f"{info.file_size}); torch never compresses tensor storage, so this file was "
                                 "not written by torch.save and is refused unread")
    if info.file_size > MAX_INFLATED_BYTES:
        raise zipfile.BadZipFile(f"{info.filename} would inflate to {info.file_size} bytes, over the "
                                 f"{MAX_INFLATED_BYTES} this reader allows for a compressed member")
    with zf.open(info) as member:
        data = member.read(MAX_INFLATED_BYTES + 1)
    if len(data) > MAX_INFLATED_BYTES:
        raise zipfile.BadZipFile(f"{info.filename} inflates past {MAX_INFLATED_BYTES} bytes (its header "
                                 f"said {info.file_size})")
    return torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8))


def _refuse_extension_opcodes(data: bytes) -> None:
    for opcode, _, _ in pickletools.genops(data):  # parses, runs nothing
        if opcode.name in ("EXT1", "EXT2", "EXT4"):
            raise pickle.UnpicklingError("extension-registry opcodes (EXT1/2/4) are not allowed")


def _unpickle_zip(path: Path, inert: Iterable[str]) -> Any:
    with open(path, "rb") as file, zipfile.ZipFile(file) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        pickles = [name for name in infos if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip file, but not a PyTorch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = prefix + "byteorder" in infos and \
            bytes(_read_member(file, zf, infos[prefix + "byteorder"]).numpy()) == b"big"
        raw_cache: dict[str, torch.Tensor] = {}

        def storage(key: str, kind: StorageType, numel: int) -> torch.Tensor:
            name = f"{prefix}data/{key}"
            if name not in infos:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive")
            if key not in raw_cache:
                raw_cache[key] = _read_member(file, zf, infos[name])
            raw = raw_cache[key]
            itemsize = kind.dtype.itemsize
            if raw.numel() != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} holds {raw.numel()} bytes, its record "
                                             f"says {numel} x {itemsize}")
            if big_endian and itemsize > 1:  # reverse the bytes of each element
                raw = raw.view(-1, itemsize).flip(1).reshape(-1)
            return raw.view(kind.dtype)  # (numel,)

        data = bytes(_read_member(file, zf, infos[pickles[0]]).numpy())
        _refuse_extension_opcodes(data)
        return _RestrictedUnpickler(data, path=path, storages=storage, inert=inert).load()


def _describe_non_zip(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return "it looks like a safetensors file under another name: rename it to .safetensors"
    if head[:1] == b"\x80":
        return ("a bare pickle: the pre-1.6 torch format (or a plain pickle), which this reader does not "
                "support. If it holds only tensors, torch.load(path, weights_only=True) reads it safely")
    if head[:2] == b"PK":
        return "a zip archive without its central directory: the file is truncated or corrupt"
    return "not a zip archive, so not a PyTorch checkpoint saved by torch >= 1.6; is it truncated?"


def read_checkpoint_full(path: str | Path, *, inert: Iterable[str] = ()) -> Any:
    """Everything a `.ckpt`/`.pt`/`.pth`/`.bin` file holds, as inert data (a `.safetensors`: its tensors).

    `inert` adds "module.Name" globals to read as placeholders (see `INERT_CLASSES`) for this call.
    Raises `UnsafeCheckpointError` for any other global, `CheckpointError` for unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in PICKLE_CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or "
                              f"one of {', '.join(PICKLE_CHECKPOINT_SUFFIXES)}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: cannot read it as a checkpoint: {_describe_non_zip(path)}")
    try:
        return _unpickle_zip(path, inert)
    except CheckpointError:
        raise
    except Exception as e:  # UnpicklingError, BadZipFile, EOFError, ...: a garbled file, named below
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                              f"is it truncated or corrupt?") from e


def state_dict_of(tree: Any, *, source: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors in a checkpoint tree: Lightning's `state_dict` entry, or the tree itself."""
    if isinstance(tree, dict) and "state_dict" in tree:
        tensors = tree["state_dict"]
        where = "its 'state_dict'"
    else:
        tensors, where = tree, "it"
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(tensors).__name__}")
    not_tensors = [str(k) for k, v in tensors.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        listed = ", ".join(not_tensors[:10])
        raise CheckpointError(f"{source}: {where} is not a plain dict of named tensors "
                              f"({len(not_tensors)} other entries: {listed}); top-level keys: "
                              f"{', '.join(map(str, list(tree)[:20])) if isinstance(tree, dict) else '-'}")
    return {key: value.detach() for key, value in tensors.items()}


def read_checkpoint(path: str | Path, *, inert: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """All model tensors of a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file, keys as stored.

    Lightning checkpoints give their `state_dict` (EMA copies `model_ema.*` included; dropping them is
    the caller's choice). Tensors of a pickle file may be views sharing one storage, as saved.
    """
    return state_dict_of(read_checkpoint_full(path, inert=inert), source=path)


def read_weights(path: str | Path, *, dtype: torch.dtype | None = None,
                 keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a model folder's weights file as `common.state_dict.find_weights` names it (those whose
    name `keys` accepts, floating ones in `dtype` when given): safetensors, one file or an index of shards,
    on the file's pages without copies (`read_safetensors`); a pickle, a `.bin` or an index of `.bin` shards
    (what a repo without safetensors holds), through the restricted unpickler above, said on stderr."""
    path = Path(path)
    shards = read_index(path) if path.name.endswith(".json") else {path: None}
    if not any(shard.suffix in PICKLE_CHECKPOINT_SUFFIXES for shard in shards):
        return read_safetensors(path, dtype=dtype, keys=keys)
    print(f"{path}: no safetensors weights here, so this pickle is read by the restricted unpickler "
          "(diffusion/checkpoints/ckpt.py: nothing in the file is run)", file=sys.stderr)
    out = {}
    for shard, names in shards.items():
        tensors = {k: v for k, v in read_checkpoint(shard).items() if keys is None or keys(k)}
        out.update(tensors if names is None else check_shard(shard, names, tensors, keys=keys))
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in out.items()}
