"""What a checkpoint's pickle may name: the allowlist that `diffusion/checkpoints/ckpt.py` answers `find_class` from.

Three kinds of entries, and nothing else:
* our own functions standing in for the rebuild functions torch, numpy and pathlib pickle
  (`_FUNCTIONS`): each checks its arguments and builds a tensor, a number or a pure path;
* inert values: the storage types (only their dtype), torch dtypes, `OrderedDict` and the builtin
  number and container types, all immutable;
* `INERT_CLASSES`, training-state classes that become placeholders (`InertObject`) holding their
  pickled data and running nothing.
The argument for why this runs nothing from the file is in `diffusion/checkpoints/ckpt.py`.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable

import numpy as np
import torch

# --- inert placeholders for known training-state classes ---------------------------------------------

# Classes that Lightning-era checkpoints pickle next to the weights. They become placeholders that
# keep their constructor arguments and pickled state as plain data and have no other behaviour.
INERT_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",  # SD v1's own .ckpt files
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",  # the same, Lightning >= 2.0
    "pytorch_lightning.utilities.parsing.AttributeDict",  # hyper_parameters (a dict subclass)
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig",  # configs saved by CompVis-style training code
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
)


class InertObject:
    """Stand-in for a pickled object of an allowlisted class: holds its data, runs nothing.

    `global_name` says which class the file named; `args`/`kwargs` are what the pickle passed to the
    constructor, `state` what it passed to `__setstate__`, `items`/`list_items` what it stored with
    SETITEMS/APPENDS (dict and list subclasses such as Lightning's AttributeDict).
    """
    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args); __new__ kept them
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def placeholder_class(global_name: str) -> type:
    name = f"InertObject[{global_name}]"
    return type(name, (InertObject,), {"global_name": global_name, "__qualname__": name})


# --- the functions a pickle may call -------------------------------------------------------------

class _Frozen:
    """Base of what the table hands the pickle: no attribute writes, so a BUILD opcode cannot alter it."""
    __slots__ = ()

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


class _Allowed(_Frozen):
    """A function the allowlist lets the pickle call, under the global name it was asked for."""
    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class StorageType(_Frozen):
    """What `torch.FloatStorage` & co. resolve to: only the dtype of the bytes, no torch class."""
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        object.__setattr__(self, "dtype", dtype)


STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                "uint8", "bool")


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2: a strided view into a storage. Hooks are data, never attached."""
    if not isinstance(storage, torch.Tensor) or type(storage_offset) is not int or not _is_int_tuple(size) \
            or not _is_int_tuple(stride) or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor record")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise pickle.UnpicklingError("negative tensor size, stride or offset")
    if 0 not in size:  # the last element must lie inside the storage
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise pickle.UnpicklingError(f"tensor of size {size} reaches past its storage ({storage.numel()})")
    return torch.as_strided(storage, size, stride, storage_offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_parameter(_with_state): we keep the plain tensor, never an nn.Parameter."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol-2 pickles spell `bytes` as `_codecs.encode(str, 'latin1')`; only that is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as str.encode('latin1')")
    return text.encode("latin1")


class _NumpyDtypeSpec:
    """What `numpy.dtype(...)` resolves to: the type name and, after BUILD, its byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(name, str):
            raise pickle.UnpicklingError("numpy.dtype needs a type name")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
    """numpy.core.multiarray.scalar: one number (Lightning stores metrics as numpy scalars)."""
    if not isinstance(dtype, _NumpyDtypeSpec) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("malformed numpy scalar")
    try:
        np_dtype = np.dtype(dtype.name).newbyteorder(dtype.byteorder)
    except TypeError as e:
        raise pickle.UnpicklingError(f"unknown numpy dtype {dtype.name!r}") from e
    if np_dtype.kind not in "biufc" or len(data) != np_dtype.itemsize:  # numbers only: no object dtype
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype.name!r} is not allowed")
    return np.frombuffer(data, dtype=np_dtype)[0]


def _byte_string(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:  # bytes(10**12) would allocate a terabyte: only copies of data allowed
        if args and not (isinstance(args[0], (bytes, bytearray)) and len(args) == 1) and \
                not (isinstance(args[0], str) and len(args) == 2 and args[1] in ("latin1", "latin-1")):
            raise pickle.UnpicklingError(f"{kind.__name__}() is allowed only on bytes or (str, 'latin-1')")
        return kind(*args)
    return make


def _pure_path(cls: type) -> Callable[..., Any]:
    def make(*parts: Any) -> Any:  # PosixPath(*parts) would be harmless too, but a pure path provably is
        if not all(isinstance(p, str) for p in parts):
            raise pickle.UnpicklingError("path parts must be strings")
        return cls(*parts)
    return make


_FUNCTIONS = {  # global name -> our function that the pickle calls in its place
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "_codecs.encode": _codecs_encode,
    "numpy.dtype": _NumpyDtypeSpec,
    "numpy.core.multiarray.scalar": _numpy_scalar,  # numpy < 2
    "numpy._core.multiarray.scalar": _numpy_scalar,
    **{f"{module}.{kind}Path": _pure_path(pure) for module in ("pathlib", "pathlib._local")
       for kind, pure in (("Posix", PurePosixPath), ("Windows", PureWindowsPath))},
    **{f"builtins.{kind.__name__}": _byte_string(kind) for kind in (bytes, bytearray)},
}
ALLOWED: dict[str, Any] = {
    **{name: _Allowed(name, fn) for name, fn in _FUNCTIONS.items()},
    **{f"torch.{name}": StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{f"torch.{name}": getattr(torch, name) for name in TORCH_DTYPES},  # torch.dtype: no attributes
    "collections.OrderedDict": OrderedDict,  # an immutable C type, like the builtin types below
    **{f"builtins.{kind.__name__}": kind for kind in (int, float, complex, bool, str, tuple, list, dict, set,
                                                      frozenset)},
}

# Only used to word the error: a file naming one of these is trying to run code, not merely odd.
CODE_RUNNING = ("os.", "posix.", "nt.", "subprocess.", "sys.", "shutil.", "socket.", "importlib.",
                "runpy.", "pty.", "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open",
                "builtins.__import__", "builtins.getattr", "builtins.setattr")
