"""common/state_dict.py: reading safetensors without copies, converting on read, key tables read both
ways, and loading into models built on the meta device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.state_dict import CheckpointError, KeyTable, read_safetensors, rename, safetensors_header
from diffusion.checkpoints.load import load_stable_diffusion

FIXTURES = Path(__file__).parent / "fixtures"
SD = FIXTURES / "sd" / "tiny_diffusers"
SINGLE = FIXTURES / "sd" / "tiny_single.safetensors"


@pytest.fixture
def mixed_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 33, generator=gen), "b.half": torch.randn(7, 5, generator=gen).half(),
               "c.index": torch.arange(10), "d.empty": torch.zeros(0, 4), "e.scalar": torch.tensor(2.5)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    return path, tensors


def test_reads_what_safetensors_reads(mixed_file):
    path, tensors = mixed_file
    got, reference = read_safetensors(path), load_file(str(path))
    assert got.keys() == reference.keys() == tensors.keys()
    for k in got:
        assert got[k].dtype == reference[k].dtype and torch.equal(got[k], reference[k]), k
    assert safetensors_header(path)[1] == {"format": "pt", "note": "x"}
    assert read_safetensors(path, keys=lambda k: k.startswith("a.")).keys() == {"a.weight"}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_tensors_are_views_of_the_file_and_writes_never_reach_it(mixed_file):
    path, tensors = mixed_file
    got = read_safetensors(path)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    of_file = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if m[-1] == str(path.resolve())]
    for name in ("a.weight", "b.half", "c.index"):      # each lies in a mapping of the file itself
        assert any(lo <= got[name].data_ptr() < hi for lo, hi in of_file), name
    a = got["a.weight"]
    a.mul_(0)                                   # copy-on-write: the file keeps its numbers
    assert torch.equal(read_safetensors(path)["a.weight"], tensors["a.weight"])
    del got, a                                  # one mapping per tensor: gone with the tensors
    maps = Path("/proc/self/maps").read_text()
    assert str(path.resolve()) not in maps


def test_dtype_converts_floating_tensors_only(mixed_file):
    path, tensors = mixed_file
    got = read_safetensors(path, dtype=torch.bfloat16)
    assert got["a.weight"].dtype == got["b.half"].dtype == torch.bfloat16
    assert torch.equal(got["a.weight"], tensors["a.weight"].bfloat16())
    assert torch.equal(got["b.half"], tensors["b.half"].bfloat16())
    assert got["c.index"].dtype == torch.int64 and torch.equal(got["c.index"], tensors["c.index"])


@pytest.mark.parametrize("cut", [4, 100, -1])
def test_a_truncated_file_is_named_with_its_tensor(mixed_file, tmp_path, cut):
    path, _ = mixed_file
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as err:
        read_safetensors(bad)
    assert str(bad) in str(err.value)
    if cut == -1:   # the header is whole: the message names the last tensor, which lost its last byte
        last = max(safetensors_header(path)[0].items(), key=lambda item: item[1]["data_offsets"][1])[0]
        assert f"tensor {last} runs past the end of the file" in str(err.value) and "truncated" in str(err.value)


def test_a_lying_header_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    bad = tmp_path / "lying.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(CheckpointError, match=r"tensor w: 60 bytes for shape \(4, 4\) of F32 \(64 expected\)"):
        read_safetensors(bad)


@pytest.mark.parametrize("path", [SD, SINGLE], ids=["folder", "single_file"])
def test_models_load_onto_the_files_pages_or_in_the_dtype_asked(path):
    config = {"config_dir": SD} if path == SINGLE else {}
    fp32 = load_stable_diffusion(path, **config)
    bf16 = load_stable_diffusion(path, **config, dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(fp32, name).state_dict(), getattr(bf16, name).state_dict()
        assert not any(v.is_meta for v in a.values()) and not any(v.is_meta for v in b.values())
        assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.float32}
        assert {v.dtype for v in b.values() if v.is_floating_point()} == {torch.bfloat16}
        for k in a:
            assert torch.equal(a[k].bfloat16(), b[k]), (name, k)


def test_an_empty_model_skips_initialisation_and_restores_it():
    """Building for loading allocates and initialises nothing (on meta tensors torch's initialisers run
    through reference kernels whose first use imports torch._dynamo: 1.7 s of a 2 s CLIP load)."""
    import subprocess
    import sys
    probe = ("import sys, torch; from clip.weights import load_text_encoder; "
             f"load_text_encoder({str(SD / 'text_encoder')!r}); print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parent.parent, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False"
    from common.state_dict import empty_model
    normal = torch.nn.init.normal_
    with empty_model():
        layer = torch.nn.Embedding(4, 3)
    assert layer.weight.is_meta and torch.nn.init.normal_ is normal


# ---- key tables ---------------------------------------------------------------------------------------
TABLE = KeyTable([("blocks.{i}.norm.{w}", "layer.{i}.ln.{w}"),
                  ("blocks.{i}.{rest}", "layer.{i}.{rest}")], drop=["layer.{i}.buffer"])


def test_a_key_table_reads_both_ways():
    theirs = {"layer.0.ln.weight": 1, "layer.12.attn.out.bias": 2, "layer.0.buffer": 3, "other": 4}
    ours = rename(theirs, TABLE)
    assert ours == {"blocks.0.norm.weight": 1, "blocks.12.attn.out.bias": 2, "other": 4}  # dropped; unknown kept
    assert rename(ours, TABLE, reverse=True) == {k: v for k, v in theirs.items() if k != "layer.0.buffer"}
    assert TABLE.name("unknown") is None and TABLE.drops("layer.3.buffer") and not TABLE.drops("layer.x.buffer")


def test_two_tensors_onto_one_name_are_refused():
    with pytest.raises(CheckpointError, match=r"two checkpoint tensors map onto 'blocks\.0\.norm\.weight' "
                                              r"\(the second is 'blocks\.0\.norm\.weight'\)"):
        rename({"layer.0.ln.weight": 1, "blocks.0.norm.weight": 2}, TABLE)


def test_a_row_must_read_both_ways():
    with pytest.raises(ValueError, match="must hold the same fields"):
        KeyTable([("blocks.{i}.weight", "layer.0.weight")])
    with pytest.raises(ValueError, match=r"unknown field \{k\}"):
        KeyTable([("blocks.{k}", "layer.{k}")])


def test_write_safetensors_is_the_same_bytes_for_the_same_contents(tmp_path):
    """safetensors orders the metadata anew on each write; write_safetensors sorts it, so convert.py, the savers
    and the fixture tools write the same file for the same tensors and metadata."""
    from common.state_dict import write_safetensors
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16)}
    metadata = {k: k * 3 for k in "zyxwvu"}
    for name in ("1", "2", "3"):
        write_safetensors(tmp_path / f"{name}.safetensors", tensors, metadata)
    data = [(tmp_path / f"{name}.safetensors").read_bytes() for name in ("1", "2", "3")]
    assert data[0] == data[1] == data[2]
    header, meta, _ = safetensors_header(tmp_path / "1.safetensors")
    assert list(meta) == sorted(metadata) and meta == metadata
    back = load_file(tmp_path / "1.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.safetensors", "2.safetensors", "3.safetensors"]
