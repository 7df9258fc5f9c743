"""The safe `.ckpt` reader (diffusion/ckpt.py) and the converter (diffusion/convert.py).

* A Lightning-style checkpoint written by the dev generator (tools/make_reference_ckpt.py, another
  torch version) reads back to exactly the tensors and training state the generator recorded.
* Malicious pickles (built here, so the payload is visible next to the test) are refused with an
  error naming the global, and their command provably did not run: the marker file it would create
  does not exist, while plain `torch.load(weights_only=False)` of the same file does create it.
* Truncated and non-checkpoint files give errors naming the file; the converter writes safetensors
  that read back equal, fp16 with --half, EMA copies only with --keep_ema.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.state_dict import CheckpointError, read_safetensors, safetensors_metadata
from diffusion import ckpt
from diffusion import convert as convert_module
from diffusion.ckpt import (InertObject, UnsafeCheckpointError, read_checkpoint, read_checkpoint_full,
                            state_dict_of)

FIXTURES = Path(__file__).parent / "fixtures" / "ckpt"
SMALL_CKPT = FIXTURES / "lightning_small.ckpt"
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


# --- a genuine Lightning-style file -------------------------------------------------------------

def test_lightning_ckpt_reads_to_its_safetensors_twin():
    assert_same_tensors(read_checkpoint(SMALL_CKPT), read_safetensors(FIXTURES / "lightning_small.safetensors"))


def test_lightning_training_state_becomes_inert_data():
    expected = json.loads((FIXTURES / "lightning_small.json").read_text())
    tree = read_checkpoint_full(SMALL_CKPT)
    for key in ("epoch", "global_step", "pytorch-lightning_version"):
        assert tree[key] == expected[key]
    [(callback_class, state)] = tree["callbacks"].items()  # keyed by the class itself, as Lightning 1.4 did
    assert issubclass(callback_class, InertObject) and callback_class.global_name == expected["callback_key"]
    assert {k: (v.item() if isinstance(v, np.generic) else v) for k, v in state.items()} == \
        expected["callback_state"]
    assert {k: v.dtype.name for k, v in state.items() if isinstance(v, np.generic)} == \
        expected["callback_numpy_dtypes"]
    assert tree["optimizer_states"][0]["state"][0]["step"] == expected["optimizer_step"]


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a torch zip, passing each member's (name, bytes) through `change`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info)))


def test_big_endian_file_reads_the_same(tmp_path, monkeypatch):
    """A file written on a big-endian machine: byteorder says 'big', each element's bytes reversed."""
    itemsize = {}  # storage key -> element size, recorded while reading the little-endian original
    original = ckpt._RestrictedUnpickler.persistent_load

    def recording(self, pid):
        itemsize[pid[2]] = pid[1].dtype.itemsize
        return original(self, pid)

    with monkeypatch.context() as m:
        m.setattr(ckpt._RestrictedUnpickler, "persistent_load", recording)
        little = read_checkpoint(SMALL_CKPT)

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name and itemsize[name.rsplit("/", 1)[-1]] > 1:
            size = itemsize[name.rsplit("/", 1)[-1]]
            return np.frombuffer(data, dtype=np.uint8).reshape(-1, size)[:, ::-1].tobytes()
        return data

    _rewrite_zip(SMALL_CKPT, tmp_path / "big.ckpt", to_big_endian)
    assert_same_tensors(read_checkpoint(tmp_path / "big.ckpt"), little)
