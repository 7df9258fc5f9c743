"""The safe `.ckpt` reader (diffusion/checkpoints/ckpt.py) and the converter (diffusion/checkpoints/convert.py).

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
import struct
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from common.state_dict import CheckpointError, read_safetensors, safetensors_metadata
from diffusion.checkpoints import ckpt
from diffusion.checkpoints import convert as convert_module
from diffusion.checkpoints.ckpt import InertObject, UnsafeCheckpointError, read_checkpoint, read_checkpoint_full

FIXTURES = Path(__file__).parent / "fixtures" / "ckpt"
SMALL_CKPT = FIXTURES / "lightning_small.ckpt"
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"
SINGLE = Path(__file__).parent / "fixtures" / "sd" / "tiny_single.safetensors"


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


def test_plain_python_values_read_back(tmp_path):
    values = {"set": {1, 2}, "frozenset": frozenset({3}), "bytearray": bytearray(b"ab"), "bytes": b"xyz",
              "complex": 1 + 2j, "tuple": (1, 2.5, None, True, "s"), "types": [int, float, dict],
              "dtype": torch.bfloat16, "ordered": OrderedDict(a=1)}
    torch.save(values, tmp_path / "values.pt")
    assert read_checkpoint_full(tmp_path / "values.pt") == values


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


@pytest.fixture(scope="module")
def tiny_single_ckpt(tmp_path_factory) -> Path:
    """The tiny SD v1 single file saved the way SD v1 was published: a Lightning .ckpt.

    Built here rather than stored, so it cannot go stale when tools/make_reference_sd.py regenerates
    its twin. Lightning is not installed: a stand-in ModelCheckpoint class sits in sys.modules under
    Lightning's module path while torch.save runs, so the pickle names the same global as SD's files.
    """
    path = tmp_path_factory.mktemp("ckpt") / "tiny_single.ckpt"
    stand_in = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
    parts = LIGHTNING.split(".")
    added = [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[LIGHTNING].ModelCheckpoint = stand_in
    try:
        torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                    "state_dict": OrderedDict(read_safetensors(SINGLE)),
                    "callbacks": {stand_in: {"best_model_score": None, "current_score": np.float64(0.25)}}}, path)
    finally:
        for name in added:
            del sys.modules[name]
    return path


def test_tiny_sd_ckpt_reads_to_its_safetensors_twin(tiny_single_ckpt):
    [callback] = read_checkpoint_full(tiny_single_ckpt)["callbacks"]  # the file names Lightning's class
    assert callback.global_name == f"{LIGHTNING}.ModelCheckpoint"
    assert_same_tensors(read_checkpoint(tiny_single_ckpt), read_safetensors(SINGLE))
    assert convert_module.main([str(tiny_single_ckpt), str(tiny_single_ckpt.with_suffix(".safetensors"))]) == 0
    assert_same_tensors(read_safetensors(tiny_single_ckpt.with_suffix(".safetensors")), read_safetensors(SINGLE))


def test_tiny_sd_ckpt_samples_the_same_image_as_its_safetensors_twin(tiny_single_ckpt, tmp_path, capsys):
    """Through load_stable_diffusion and sample.py: the .ckpt gives bit-identical pixels."""
    import sample
    from PIL import Image

    folder = SINGLE.parent / "tiny_diffusers"  # configs for what the tiny file's shapes cannot say
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on the shared machine
    try:
        images = {}
        for name, ckpt in (("safetensors", SINGLE), ("ckpt", tiny_single_ckpt)):
            written = sample.main(["--ckpt", str(ckpt), "--config", str(folder), "--outdir", str(tmp_path / name),
                                   "--prompt", "a photo of a cat", "--n_samples", "1", "--ddim_steps", "3",
                                   "--H", "32", "--W", "32", "--seed", "3", "--device", "cpu"])
            images[name] = np.asarray(Image.open(written[0]))
    finally:
        torch.set_num_threads(before)
    assert images["ckpt"].shape == (32, 32, 3) and images["ckpt"].std() > 0
    assert np.array_equal(images["ckpt"], images["safetensors"])


def test_full_ema_ckpt_converts_with_and_without_its_ema_copy(tmp_path):
    """A "full-ema" file: the .ckpt, and its conversion with --keep_ema, load the same EMA UNet
    through load_stable_diffusion(use_ema=True); the default conversion drops the copy."""
    from diffusion.checkpoints.single_file import ema_name
    from diffusion.checkpoints.load import load_stable_diffusion

    folder = SINGLE.parent / "tiny_diffusers"
    tensors = read_safetensors(SINGLE)
    gen = torch.Generator().manual_seed(0)
    ema = {ema_name(k): v + 0.01 * torch.randn(v.shape, generator=gen)
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    ema |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int32)}
    ckpt = tmp_path / "full-ema.ckpt"
    torch.save({"epoch": 1, "state_dict": {**tensors, **ema}}, ckpt)
    assert convert_module.main([str(ckpt), str(tmp_path / "ema.safetensors"), "--keep_ema"]) == 0
    assert convert_module.main([str(ckpt), str(tmp_path / "plain.safetensors")]) == 0

    def unet(path, use_ema):
        return load_stable_diffusion(path, config_dir=folder, use_ema=use_ema).unet.state_dict()

    ema_unet = unet(ckpt, True)
    assert_same_tensors(unet(tmp_path / "ema.safetensors", True), ema_unet)
    plain_unet = unet(tmp_path / "plain.safetensors", False)
    assert_same_tensors(plain_unet, unet(SINGLE, False))
    assert not torch.equal(plain_unet["conv_in.weight"], ema_unet["conv_in.weight"])
    with pytest.raises(CheckpointError, match="no EMA weights"):
        unet(tmp_path / "plain.safetensors", True)


# --- malicious files --------------------------------------------------------------------------------

def write_torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A .ckpt laid out as torch.save lays it out, around a hand-written pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def call_global(module: str, name: str, *args) -> bytes:
    """Pickle opcodes that push `module.name` (GLOBAL) and call it with `args` (REDUCE)."""
    return b"c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1] + b"R"


def lightning_like(payload: bytes) -> bytes:
    """{'epoch': 1, 'state_dict': {}, 'callbacks': <payload>}: the payload where Lightning's state sits."""
    return (b"\x80\x02}(" + pickle.dumps("epoch", 2)[2:-1] + b"K\x01" + pickle.dumps("state_dict", 2)[2:-1]
            + b"}" + pickle.dumps("callbacks", 2)[2:-1] + payload + b"u.")


class Tripwire:
    """A class outside the allowlist whose unpickling (its __setstate__) creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).touch()


class SystemCall:
    """Pickles as a call of os.system (named `posix.system` on Linux), the classic payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def _os_system(marker: Path) -> tuple[bytes, str]:
    return lightning_like(call_global("os", "system", f"touch {marker}")), "os.system"


def _posix_system_by_torch_save(marker: Path) -> tuple[bytes, str]:
    buf = io.BytesIO()
    torch.save({"state_dict": {}, "callbacks": SystemCall(f"touch {marker}")}, buf)
    with zipfile.ZipFile(buf) as z:
        [name] = [n for n in z.namelist() if n.endswith("data.pkl")]
        return z.read(name), "posix.system"


def _exec(marker: Path) -> tuple[bytes, str]:
    return lightning_like(call_global("builtins", "exec", f"open({str(marker)!r}, 'w').close()")), "builtins.exec"


def _eval(marker: Path) -> tuple[bytes, str]:
    return lightning_like(call_global("builtins", "eval", f"open({str(marker)!r}, 'w')")), "builtins.eval"


def _eval_python2_spelling(marker: Path) -> tuple[bytes, str]:
    return lightning_like(call_global("__builtin__", "eval", f"open({str(marker)!r}, 'w')")), "builtins.eval"


def _subprocess(marker: Path) -> tuple[bytes, str]:
    return lightning_like(call_global("subprocess", "call", ["touch", str(marker)])), "subprocess.call"


def _class_outside_allowlist(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps({"state_dict": {}, "callbacks": Tripwire(str(marker))}, protocol=2), \
        f"{Tripwire.__module__}.Tripwire"


def _stack_global_protocol_4(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps({"callbacks": SystemCall(f"touch {marker}")}, protocol=4), "posix.system"


def _inst_protocol_0(marker: Path) -> tuple[bytes, str]:
    return b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.", "os.system"


PAYLOADS = [_os_system, _posix_system_by_torch_save, _exec, _eval, _eval_python2_spelling, _subprocess, _class_outside_allowlist,
            _stack_global_protocol_4, _inst_protocol_0]


@pytest.mark.parametrize("make", PAYLOADS, ids=lambda f: f.__name__.strip("_"))
def test_malicious_pickle_is_refused_and_runs_nothing(make, tmp_path):
    marker = tmp_path / "marker"
    data, global_name = make(marker)
    path = write_torch_zip(tmp_path / "evil.ckpt", data)
    for read in (read_checkpoint, read_checkpoint_full):
        with pytest.raises(UnsafeCheckpointError) as err:
            read(path)
        message = str(err.value)
        assert repr(global_name) in message and str(path) in message and "safetensors" in message
        assert not marker.exists()
    # The converter reads through the same door: it refuses too, and writes nothing.
    assert convert_module.main([str(path), str(tmp_path / "out.safetensors")]) == 1
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("make", [_os_system, _exec, _class_outside_allowlist], ids=["os.system", "exec", "class"])
def test_payloads_are_live_under_plain_torch_load(make, tmp_path):
    """The control: the same files DO create the marker when unpickled without restriction."""
    marker = tmp_path / "marker"
    path = write_torch_zip(tmp_path / "evil.ckpt", make(marker)[0])
    torch.load(path, weights_only=False)  # unsafe on purpose, on our own harmless payload
    assert marker.exists()


def test_refusal_names_the_global_and_the_way_out(tmp_path):
    path = write_torch_zip(tmp_path / "odd.ckpt", lightning_like(call_global(
        "pytorch_lightning.callbacks.early_stopping", "EarlyStopping")))
    with pytest.raises(UnsafeCheckpointError, match="--inert pytorch_lightning.callbacks.early_stopping"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="malicious"):
        read_checkpoint(write_torch_zip(tmp_path / "evil.ckpt", _os_system(tmp_path / "m")[0]))


def test_unknown_globals_are_never_imported(tmp_path):
    """find_class is a table lookup: refusing `this.s` must not even import `this` (it prints on import)."""
    assert "this" not in sys.modules
    with pytest.raises(UnsafeCheckpointError, match="'this.s'"):
        read_checkpoint(write_torch_zip(tmp_path / "a.ckpt", lightning_like(call_global("this", "s"))))
    assert "this" not in sys.modules


def test_extra_inert_class_reads_as_placeholder(tmp_path):
    name = "pytorch_lightning.callbacks.early_stopping.EarlyStopping"
    path = write_torch_zip(tmp_path / "es.ckpt", lightning_like(
        call_global(*name.rsplit(".", 1), "val_loss") + pickle.dumps({"patience": 3}, 2)[2:-1] + b"b"))
    callback = read_checkpoint_full(path, inert=[name])["callbacks"]
    assert isinstance(callback, InertObject) and callback.global_name == name
    assert callback.args == ("val_loss",) and callback.state == {"patience": 3}
    assert read_checkpoint(path, inert=[name]) == {}


def test_extension_opcodes_are_refused(tmp_path):
    """EXT1/2/4 name globals through copyreg's registry, answered from a cache that skips find_class."""
    with pytest.raises(CheckpointError, match="EXT1"):
        read_checkpoint(write_torch_zip(tmp_path / "ext.ckpt", b"\x80\x02\x82\x01."))


def test_allowed_callables_cannot_be_tampered_with(tmp_path):
    """A BUILD on an allowlisted function (to change it for a later load) fails instead."""
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + pickle.dumps({"fn": "x"}, 2)[2:-1] + b"b."
    with pytest.raises(CheckpointError):
        read_checkpoint_full(write_torch_zip(tmp_path / "t.ckpt", data))
    assert read_checkpoint(SMALL_CKPT)  # later loads unaffected


# --- broken files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.99, -1, 10], ids=["half", "99%", "last-byte-cut", "10-bytes"])
def test_truncated_ckpt_gives_a_clear_error(keep, tmp_path):
    data = SMALL_CKPT.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    with pytest.raises(CheckpointError, match="truncated") as err:
        read_checkpoint(cut)
    assert str(cut) in str(err.value)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    data = bytearray(SMALL_CKPT.read_bytes())
    with zipfile.ZipFile(SMALL_CKPT) as z:
        info = z.getinfo("lightning_small/data/0")
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # local header's own
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0xFF  # one byte of the first storage
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        read_checkpoint(tmp_path / "bad.ckpt")


def test_file_saved_without_crc_reads(tmp_path):
    """torch.save can skip the CRCs (set_crc32_options(False)), writing 0; zipfile would reject that."""
    tensors = read_safetensors(FIXTURES / "lightning_small.safetensors")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"state_dict": tensors}, tmp_path / "nocrc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert_same_tensors(read_checkpoint(tmp_path / "nocrc.ckpt"), tensors)


def test_non_checkpoints_give_clear_errors(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt.*not a zip archive"):
        read_checkpoint(tmp_path / "notes.ckpt")
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="other.ckpt.*no <name>/data.pkl"):
        read_checkpoint(tmp_path / "other.ckpt")
    (tmp_path / "old.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="old.pt.*pre-1.6"):
        read_checkpoint(tmp_path / "old.pt")
    (tmp_path / "renamed.ckpt").write_bytes((FIXTURES / "lightning_small.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="renamed.ckpt.*rename it to .safetensors"):
        read_checkpoint(tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError, match="missing.ckpt: no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(CheckpointError, match="weights.h5: unknown checkpoint suffix"):
        read_checkpoint(tmp_path / "weights.h5")
    torch.save({"model": {"w": torch.ones(1)}, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="nested.pt.*not a plain dict of named tensors.*model"):
        read_checkpoint(tmp_path / "nested.pt")


def test_plain_torch_state_dict_file_reads(tmp_path):
    """A .pt holding just a state dict (no Lightning wrapper) and a .safetensors both read."""
    tensors = read_safetensors(FIXTURES / "lightning_small.safetensors")
    torch.save(tensors, tmp_path / "plain.pt")
    assert_same_tensors(read_checkpoint(tmp_path / "plain.pt"), tensors)
    assert_same_tensors(read_checkpoint(FIXTURES / "lightning_small.safetensors"), tensors)


# --- the converter ---------------------------------------------------------------------------------

def test_convert_drops_ema_and_reads_back_equal(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert convert_module.main([str(SMALL_CKPT), str(out)]) == 0
    assert "left out 4 EMA tensors" in capsys.readouterr().out
    original = read_checkpoint(SMALL_CKPT)
    assert_same_tensors(read_safetensors(out), {k: v for k, v in original.items() if not k.startswith("model_ema.")})
    assert safetensors_metadata(out)["global_step"] == "470000"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_convert_half_and_keep_ema(tmp_path):
    out = tmp_path / "half.safetensors"
    assert convert_module.main([str(SMALL_CKPT), str(out), "--half", "--keep_ema"]) == 0
    original = read_checkpoint(SMALL_CKPT)
    want = {k: (v.half() if v.is_floating_point() and v.dim() > 0 else v) for k, v in original.items()}
    assert_same_tensors(read_safetensors(out), want)
    assert any(k.startswith("model_ema.") for k in want)
    assert read_safetensors(out)["model_ema.decay"].item() == pytest.approx(0.9999)  # fp16 would say 1.0


def test_convert_refuses_fp16_overflow_and_bad_output(tmp_path):
    torch.save({"state_dict": {"big": torch.tensor([1e6])}}, tmp_path / "big.ckpt")
    assert convert_module.main([str(tmp_path / "big.ckpt"), str(tmp_path / "o.safetensors"), "--half"]) == 1
    assert convert_module.main([str(SMALL_CKPT), str(tmp_path / "o.ckpt")]) == 1
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.ckpt").exists()


def test_failed_conversion_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier conversion")
    evil = write_torch_zip(tmp_path / "evil.ckpt", _os_system(tmp_path / "marker")[0])
    assert convert_module.main([str(evil), str(out)]) == 1

    def disk_full(tensors, tmp, metadata):
        Path(tmp).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)   # under write_safetensors
    assert convert_module.main([str(SMALL_CKPT), str(out)]) == 1
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "model.safetensors"]  # no .tmp left


def test_convert_runs_as_a_module(tmp_path):
    out = tmp_path / "m.safetensors"
    run = subprocess.run([sys.executable, "-m", "diffusion.checkpoints.convert", str(SMALL_CKPT), str(out), "--half"],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and out.exists()


def test_allocation_bombs_are_refused(tmp_path):
    """bytes(n) / bytearray(n) would allocate n zero bytes from a few bytes of pickle."""
    for kind in ("bytes", "bytearray"):
        with pytest.raises(CheckpointError, match=f"{kind}\\(\\) is allowed only"):
            read_checkpoint(write_torch_zip(tmp_path / f"{kind}.ckpt", lightning_like(
                call_global("builtins", kind, 10**13))))


# --- zip bombs ----------------------------------------------------------------------------------------

def test_a_compressed_tensor_storage_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """torch never compresses storages; a 'checkpoint' whose storage is a 64 MB run of zeros deflated
    to 64 KB is refused without inflating it (today's 1 MB file inflated to 1 GB)."""
    torch.save({"w": torch.zeros(4)}, tmp_path / "plain.ckpt")
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(tmp_path / "plain.ckpt") as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            if "/data/" in info.filename:
                zout.writestr(info.filename, bytes(64 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_STORED)
    assert bomb.stat().st_size < 2**20
    inflated = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: inflated.append(name) or
                        real_open(self, name, *a, **k))
    with pytest.raises(CheckpointError, match="torch never compresses tensor storage"):
        read_checkpoint(bomb)
    assert inflated == []


def test_a_compressed_pickle_inflates_only_within_its_bound(tmp_path, monkeypatch):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "plain.ckpt")
    rezipped = tmp_path / "rezipped.ckpt"
    with zipfile.ZipFile(tmp_path / "plain.ckpt") as zin, zipfile.ZipFile(rezipped, "w") as zout:
        for info in zin.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info), compress_type=kind)
    assert torch.equal(read_checkpoint(rezipped)["w"], torch.arange(4.0))   # a re-zipped pickle still reads
    monkeypatch.setattr(ckpt, "MAX_INFLATED_BYTES", 16)                      # now it is "too large"
    with pytest.raises(CheckpointError, match="data.pkl .*inflate"):
        read_checkpoint(rezipped)
