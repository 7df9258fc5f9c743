"""CLIP text-encoder key mapping: the real checkpoints' manifests map exactly onto our model, bad files fail clearly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip.text_model import CLIPTextConfig, CLIPTextModel
from clip.weights import config_from_state_dict, load_text_encoder, text_encoder_state_dict
from common.state_dict import CheckpointError, check_keys

FIXTURES = Path(__file__).parent / "fixtures" / "clip"
MANIFESTS = Path(__file__).parent / "manifests"
CLIP_MANIFESTS = ["clip_sd_v1_text_encoder.json", "clip_sd_v1_single_file.json", "clip_vit_l14_full.json"]


def _fake_tensors(manifest: dict, *, with_optional: bool) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in manifest["tensors"].items()
            if with_optional or k not in manifest["optional"]}


@pytest.mark.parametrize("with_optional", [True, False], ids=["with_position_ids", "without"])
@pytest.mark.parametrize("name", CLIP_MANIFESTS)
def test_manifest_maps_exactly_onto_vit_l14(name, with_optional):
    manifest = json.loads((MANIFESTS / name).read_text())
    ours = text_encoder_state_dict(_fake_tensors(manifest, with_optional=with_optional), source=name)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.vit_l14())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in ours.items()}, source=name)  # nothing missing or left over
    assert config_from_state_dict(ours) == CLIPTextConfig.vit_l14()
    assert CLIPTextConfig.from_dict(manifest["text_config"]) == CLIPTextConfig.vit_l14()


def test_tiny_layouts_give_identical_tensors():
    folder = load_file(FIXTURES / "text_encoder" / "model.safetensors")
    reference = text_encoder_state_dict(folder, source="folder")
    variants = {
        # transformers 5 saves CLIPTextModel without the text_model. prefix (and without position_ids)
        "transformers 5": {k.removeprefix("text_model."): v for k, v in folder.items() if "position_ids" not in k},
        "sd single file": load_file(FIXTURES / "sd_v1_single_file.safetensors"),
        # some early SD v1 files have no text_model. level under cond_stage_model.transformer.
        "sd single file, no text_model.": {f"cond_stage_model.transformer.{k.removeprefix('text_model.')}": v
                                           for k, v in folder.items()},
        "full CLIPModel": load_file(FIXTURES / "clip_model" / "model.safetensors"),
    }
    for name, state_dict in variants.items():
        ours = text_encoder_state_dict(state_dict, source=name)
        assert ours.keys() == reference.keys(), name
        assert all(torch.equal(ours[k], reference[k]) for k in ours), name


def test_caller_state_dict_untouched():
    folder = load_file(FIXTURES / "text_encoder" / "model.safetensors")
    keys = list(folder)
    text_encoder_state_dict(folder, source="folder")
    assert list(folder) == keys


def test_unrecognised_keys_are_named():
    folder = load_file(FIXTURES / "text_encoder" / "model.safetensors")
    folder["text_model.encoder.layers.0.self_attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"my.safetensors: 1 tensors are not part of .*layers\.0\.self_attn\.qkv"):
        text_encoder_state_dict(folder, source="my.safetensors")


def test_sd2_open_clip_layout_gets_a_hint():
    state_dict = {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match="OpenCLIP ViT-H/14 text tower of SD 2.x"):
        text_encoder_state_dict(state_dict, source="v2.safetensors")


def test_file_of_another_width(tmp_path):
    """The tiny file is 32 wide; a config saying 768 (or a config.json saying 64) stops the load by name."""
    single = FIXTURES / "sd_v1_single_file.safetensors"
    with pytest.raises(CheckpointError, match=r"sd_v1_single_file.safetensors: the text encoder in this file is 32 wide, "
                                              r"but the config says hidden_size=768"):
        load_text_encoder(single, config=CLIPTextConfig.vit_l14())
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIXTURES / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="32 wide, but the config says hidden_size=64"):
        load_text_encoder(folder)


def test_width_not_a_multiple_of_64_needs_a_config():
    with pytest.raises(CheckpointError, match="width 32 is not a multiple of 64; pass a config"):
        load_text_encoder(FIXTURES / "sd_v1_single_file.safetensors")
    ours = text_encoder_state_dict(load_file(FIXTURES / "sd_v1_single_file.safetensors"), source="x")
    assert config_from_state_dict(ours, num_attention_heads=4).num_hidden_layers == 3


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    folder = load_file(FIXTURES / "text_encoder" / "model.safetensors")
    del folder["text_model.encoder.layers.1.mlp.fc2.bias"]
    folder["text_model.final_layer_norm.weight"] = torch.zeros(31)
    save_file(folder, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1: layers\.1\.mlp\.fc2\.bias.*mis-shaped 1: final_layer_norm\.weight"):
        load_text_encoder(tmp_path / "broken.safetensors", config=CLIPTextConfig.from_json(FIXTURES / "text_encoder" / "config.json"))


def test_folder_without_weights(tmp_path):
    shutil.copy(FIXTURES / "text_encoder" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors in this folder"):
        load_text_encoder(tmp_path)


def test_fixture_budget():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 1.5e6, f"tests/fixtures/clip holds {total / 1e6:.2f} MB, over its 1.5 MB budget"


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_text_encoder(tmp_path / "missing.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        load_text_encoder(tmp_path / "model.ckpt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_text_encoder(tmp_path / "garbage.safetensors")
