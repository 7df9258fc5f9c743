"""Loading SD v1 checkpoints: the key mappings cover the real SD v1.5 files exactly (manifests), loads
are strict and name what is wrong, EMA selection, shape inference, the whole-checkpoint loader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.state_dict import CheckpointError, check_keys, read_safetensors, rename
from diffusion.checkpoints import single_file
from diffusion.models.unet import UNet2DConditionModel, UNetConfig
from diffusion.models.vae import AutoencoderKL, VAEConfig
from diffusion.checkpoints.load import (load_stable_diffusion, load_unet_folder, load_unet_single_file, load_vae_folder,
                               load_vae_single_file)

ROOT = Path(__file__).parent
FOLDER, SINGLE = ROOT / "fixtures/sd/tiny_diffusers", ROOT / "fixtures/sd/tiny_single.safetensors"
MANIFESTS = ROOT / "manifests"


def fake(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def shapes_of(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sd_v1_models():
    with torch.device("meta"):
        return UNet2DConditionModel(config=UNetConfig.sd_v1()), AutoencoderKL(config=VAEConfig.sd_v1())


@pytest.fixture(scope="module")
def tiny_tensors():
    return read_safetensors(SINGLE)


# ------------------------------------------------------------------ real SD v1.5 manifests
def test_single_file_manifest_is_covered_exactly(sd_v1_models):
    manifest = json.loads((MANIFESTS / "sd_v1_single_file.json").read_text())
    tensors = fake(manifest["model_tensors"]) | fake(manifest["schedule_buffers"])
    assert len(manifest["model_tensors"]) == 1131
    unet_t, vae_t, text_t = single_file.split_single_file(tensors, use_ema=False, source="manifest")
    assert (len(unet_t), len(vae_t), len(text_t)) == (686, 248, 197)
    # the shapes alone give back exactly SD v1's configs
    assert single_file.infer_unet_config(unet_t, source="manifest") == UNetConfig.sd_v1()
    assert single_file.infer_vae_config(vae_t, source="manifest") == VAEConfig.sd_v1()
    unet, vae = sd_v1_models
    renamed_unet = rename(unet_t, single_file.unet_table(UNetConfig.sd_v1()))
    check_keys(shapes_of(unet), {k: tuple(v.shape) for k, v in renamed_unet.items()}, source="unet")
    renamed_vae = single_file.vae_attention_as_linear(rename(vae_t, single_file.vae_table(VAEConfig.sd_v1())))
    check_keys(shapes_of(vae), {k: tuple(v.shape) for k, v in renamed_vae.items()}, source="vae")


def test_diffusers_manifest_is_covered_exactly(sd_v1_models):
    files = json.loads((MANIFESTS / "sd_v1_diffusers.json").read_text())["files"]
    unet, vae = sd_v1_models
    check_keys(shapes_of(unet), {k: tuple(v) for k, v in files["unet/diffusion_pytorch_model.safetensors"].items()},
               source="unet")
    vae_t = single_file.vae_attention_as_linear(rename(fake(files["vae/diffusion_pytorch_model.safetensors"]),
                                                   single_file.DEPRECATED_VAE_ATTENTION_KEYS))
    check_keys(shapes_of(vae), {k: tuple(v.shape) for k, v in vae_t.items()}, source="vae")


def test_text_encoder_manifests_are_covered_exactly():
    from clip.text_model import CLIPTextModel
    from clip.weights import config_from_state_dict, text_encoder_state_dict
    single = json.loads((MANIFESTS / "sd_v1_single_file.json").read_text())["model_tensors"]
    folder = json.loads((MANIFESTS / "sd_v1_diffusers.json").read_text())["files"]["text_encoder/model.safetensors"]
    for shapes in ({k.removeprefix(single_file.TEXT_PREFIX): v for k, v in single.items() if k.startswith(single_file.TEXT_PREFIX)},
                   folder):
        ours = text_encoder_state_dict(fake(shapes), source="manifest")
        with torch.device("meta"):
            model = CLIPTextModel(config_from_state_dict(ours))
        check_keys(shapes_of(model), {k: tuple(v.shape) for k, v in ours.items()}, source="text encoder")


# ------------------------------------------------------------------ strict loading names the culprit
def test_single_file_errors_name_missing_unexpected_misshaped(tiny_tensors):
    unet_t, vae_t, _ = single_file.split_single_file(tiny_tensors, use_ema=False, source="tiny")
    cfg = UNetConfig.from_json(FOLDER / "unet" / "config.json")
    key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    with pytest.raises(CheckpointError, match=r"missing 1: down_blocks\.0\.resnets\.0\.norm1\.weight"):
        load_unet_single_file({k: v for k, v in unet_t.items() if k != key}, cfg, source="tiny")
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.diffusion_model\.extra\.weight"):
        load_unet_single_file({**unet_t, "model.diffusion_model.extra.weight": torch.zeros(1)}, cfg, source="tiny")
    with pytest.raises(CheckpointError, match=r"mis-shaped 1: down_blocks\.0\.resnets\.0\.norm1\.weight "
                                              r"\(checkpoint \(3,\), model \(16,\)\)"):
        load_unet_single_file({**unet_t, key: torch.zeros(3)}, cfg, source="tiny")
    vcfg = VAEConfig.from_json(FOLDER / "vae" / "config.json")
    vkey = "first_stage_model.decoder.mid.attn_1.q.weight"
    with pytest.raises(CheckpointError, match=r"\(VAE\).*missing 1: decoder\.mid_block\.attentions\.0\.to_q\.weight"):
        load_vae_single_file({k: v for k, v in vae_t.items() if k != vkey}, vcfg, source="tiny")


def test_single_file_refuses_unknown_prefixes(tiny_tensors):
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors .*: lora_unet_foo"):
        single_file.split_single_file({**tiny_tensors, "lora_unet_foo": torch.zeros(1)}, use_ema=False, source="tiny")
    no_vae = {k: v for k, v in tiny_tensors.items() if not k.startswith(single_file.VAE_PREFIX)}
    with pytest.raises(CheckpointError, match=r"no VAE \(first_stage_model\.\*\) tensors"):
        single_file.split_single_file(no_vae, use_ema=False, source="tiny")


def test_folder_errors_name_file_and_tensor(tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(FOLDER, folder)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = read_safetensors(file)
    del tensors["mid_block.attentions.0.proj_out.bias"]
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{file}.*missing 1: mid_block\.attentions\.0\.proj_out\.bias"):
        load_unet_folder(folder)
    file.unlink()
    with pytest.raises(CheckpointError, match="unet: no diffusion_pytorch_model.safetensors in this folder "
                                              r"\(nor .*\.index\.json, diffusion_pytorch_model\.bin"):
        load_unet_folder(folder)


def test_folder_with_deprecated_vae_attention_names_loads(tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(FOLDER, folder)
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = read_safetensors(file)
    renamed = {}
    for k, v in tensors.items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(file))
    a, b = load_vae_folder(folder).state_dict(), load_vae_folder(FOLDER).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------ EMA and inference
def with_ema(tensors: dict) -> dict:
    """A full (non-pruned) LDM checkpoint: EMA copies of the UNet, named as LitEma names them."""
    ema = {single_file.ema_name(k): v + 1.0 for k, v in tensors.items() if k.startswith(single_file.UNET_PREFIX)}
    return {**tensors, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}


def test_use_ema_selects_the_ema_weights(tiny_tensors):
    full = with_ema(tiny_tensors)
    assert "model_ema.diffusion_modelinput_blocks00weight" in full
    plain, _, _ = single_file.split_single_file(full, use_ema=False, source="full")
    ema, _, _ = single_file.split_single_file(full, use_ema=True, source="full")
    key = "model.diffusion_model.out.2.weight"
    assert plain.keys() == ema.keys() and torch.equal(ema[key], tiny_tensors[key] + 1.0)
    with pytest.raises(CheckpointError, match=r"--use_ema given but the file has no EMA weights"):
        single_file.split_single_file(tiny_tensors, use_ema=True, source="pruned")
    broken = {k: v for k, v in full.items() if k != "model_ema.diffusion_modelout2bias"}
    with pytest.raises(CheckpointError, match=r"EMA copy missing for 1 UNet tensors: model_ema\.diffusion_modelout2bias"):
        single_file.split_single_file(broken, use_ema=True, source="full")


def test_architecture_inferred_from_tiny_shapes(tiny_tensors, monkeypatch):
    unet_t, vae_t, _ = single_file.split_single_file(tiny_tensors, use_ema=False, source="tiny")
    # (pretend the GroupNorm check passes: the tiny widths do not divide by SD v1's 32 groups)
    monkeypatch.setattr(single_file, "_check_groups", lambda *a, **k: None)
    want = UNetConfig.from_json(FOLDER / "unet" / "config.json")
    got = single_file.infer_unet_config(unet_t, source="tiny")
    # shapes cannot tell the head count or the GroupNorm groups: SD v1's 8 and 32 are assumed
    assert got.attention_head_dim == 8 and got.norm_num_groups == 32
    assert got == UNetConfig(**{**want.to_dict(), "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 64})
    vwant = VAEConfig.from_json(FOLDER / "vae" / "config.json")
    assert single_file.infer_vae_config(vae_t, source="tiny") == VAEConfig(**{**vwant.to_dict(), "norm_num_groups": 32,
                                                                     "sample_size": 512})


# ------------------------------------------------------------------ the whole-checkpoint loader
def assert_same_models(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_load_stable_diffusion_both_layouts_and_ckpt(tmp_path, tiny_tensors):
    folder = load_stable_diffusion(FOLDER)
    assert folder.layout == "diffusers" and folder.scheduler_config["beta_schedule"] == "scaled_linear"
    single = load_stable_diffusion(SINGLE, config_dir=FOLDER)
    assert single.layout == "single_file" and single.scheduler_config["steps_offset"] == 1
    assert_same_models(folder, single)
    assert not single.unet.training
    # a Lightning-style .ckpt with EMA weights, read by diffusion/checkpoints/ckpt.py's restricted unpickler
    ckpt = tmp_path / "full.ckpt"
    full = with_ema(tiny_tensors)
    torch.save({"state_dict": full, "global_step": 10}, ckpt)
    ema = load_stable_diffusion(ckpt, config_dir=FOLDER, use_ema=True)
    key = "conv_out.weight"
    assert torch.equal(ema.unet.state_dict()[key], folder.unet.state_dict()[key] + 1.0)
    assert_same_models(load_stable_diffusion(ckpt, config_dir=FOLDER), folder)


def test_single_file_without_config_needs_sd_v1_group_counts():
    # the tiny UNet's 16 channels cannot take SD v1's 32 GroupNorm groups; shapes cannot say 8
    with pytest.raises(CheckpointError, match=r"UNet widths \(16, 32\) do not split .* pass --config DIR"):
        load_stable_diffusion(SINGLE)


def test_load_stable_diffusion_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such checkpoint"):
        load_stable_diffusion(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="--use_ema"):
        load_stable_diffusion(FOLDER, use_ema=True)
    with pytest.raises(FileNotFoundError, match=r"--config .*: no unet/config.json"):
        load_stable_diffusion(SINGLE, config_dir=tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model_index.json: no 'unet' entry"):
        load_stable_diffusion(tmp_path)
