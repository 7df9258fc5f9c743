"""CLIP's image tower, projections and preprocessing (clip/vision_model.py, model.py, model_weights.py,
preprocess.py) against transformers' CLIPModel, CLIPVisionModelWithProjection, CLIPTextModelWithProjection and
CLIPImageProcessor (tests/fixtures/clip_model, made by tools/make_reference_eval.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clip.model import CLIPConfig, CLIPModel
from clip.model_weights import CLIP_KEYS, check_clip_keys, infer_vision_config, load_clip
from clip.text_model import CLIPTextConfig
from clip.tokenizer import CLIPTokenizer
from clip.vision_model import CLIPVisionConfig
from common.images import load_image
from common.state_dict import CheckpointError, check_keys, rename
from vit.preprocess import preprocess_resize_crop

FIX = Path(__file__).parent / "fixtures"
CLIPM = FIX / "clip_model"
REF = load_file(CLIPM / "reference.safetensors")
with safe_open(CLIPM / "reference.safetensors", "pt") as f:
    META = f.metadata()
IMAGE_NAMES, PROMPTS = json.loads(META["images"]), json.loads(META["prompts"])
MANIFESTS = Path(__file__).parent / "manifests"


def images():
    return [load_image(FIX / "images" / name) for name in IMAGE_NAMES]


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---- preprocessing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,key,size,stride", [("l14", "l14_pixels", 224, 14), ("b32_vision", "b32_pixels", 64, 4)])
def test_pixels_equal_clip_image_processor(folder, key, size, stride):
    """Shorter side to the size (bicubic), centre crop (floor), CLIP mean/std: from preprocessor_config.json."""
    config = load_clip(CLIPM / folder).preprocess
    assert (config.shortest_edge, config.crop_size, config.crop_rounding) == (size, (size, size), "floor")
    pixels = preprocess_resize_crop(images(), config)
    assert (pixels[:, :, 3::stride, 5::stride] - REF[key]).abs().max().item() <= 1e-6


def test_preprocessor_config_that_cannot_work_refused(tmp_path):
    shutil.copytree(CLIPM / "b32_vision", tmp_path / "m")
    pp = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({**pp, "crop_size": {"height": 32, "width": 32}}))
    with pytest.raises(CheckpointError, match="crop_size 32x32, but the model's image tower takes 64x64"):
        load_clip(tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({**pp, "do_center_crop": False}))
    with pytest.raises(CheckpointError, match="do_center_crop False"):
        load_clip(tmp_path / "m")


# ---- embeddings, ViT-L/14 shape (a full CLIPModel file) -------------------------------------------------
def test_full_model_image_and_text_features_equal_reference():
    loaded = load_clip(CLIPM / "l14")
    model = loaded.model
    assert model.config.parts == "image and text" and model.config.projection_dim == 12
    assert model.config.vision.patch_size == 14 and model.config.vision.image_size == 224
    ids = CLIPTokenizer.from_pretrained(loaded.folder)(PROMPTS, max_length=77)
    assert torch.equal(ids, REF["l14_ids"])                       # transformers' CLIPTokenizer, padded to 77
    with torch.no_grad():
        image = model.get_image_features(preprocess_resize_crop(images(), loaded.preprocess))
        text = model.get_text_features(ids)
    assert relative(image, REF["l14_image"]) <= 1e-5
    assert relative(text, REF["l14_text"]) <= 1e-5
    file = load_file(CLIPM / "l14" / "model.safetensors")
    assert model.logit_scale.item() == file["logit_scale"].item()   # the temperature loads too (strictly)


# ---- embeddings, ViT-B/32 shape (the one-tower files) -----------------------------------------------------
def test_one_tower_files_equal_reference():
    vision, text = load_clip(CLIPM / "b32_vision"), load_clip(CLIPM / "b32_text")
    assert (vision.model.config.parts, text.model.config.parts) == ("image", "text")
    assert vision.model.config.vision.patch_size == 32 and text.preprocess is None
    assert not hasattr(vision.model, "logit_scale")               # the one-tower files hold no temperature
    with torch.no_grad():
        image = vision.model.get_image_features(preprocess_resize_crop(images(), vision.preprocess))
        features = text.model.get_text_features(REF["b32_ids"])   # SD v1's legacy pooling: the largest id
    assert relative(image, REF["b32_image"]) <= 1e-5
    assert relative(features, REF["b32_text"]) <= 1e-5
    with pytest.raises(ValueError, match="no text tower"):
        vision.model.get_text_features(REF["b32_ids"])
    with pytest.raises(ValueError, match="no image tower"):
        text.model.get_image_features(torch.zeros(1, 3, 64, 64))


def test_wrong_image_size_named():
    model = load_clip(CLIPM / "b32_vision").model
    with pytest.raises(ValueError, match=r"this model takes \(B, 3, 64, 64\)"):
        model.get_image_features(torch.zeros(1, 3, 224, 224))


# ---- strict loading and refusals -----------------------------------------------------------------------
def edited(tmp_path, change) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(CLIPM / "b32_vision", folder)
    sd = load_file(folder / "model.safetensors")
    change(sd)
    save_file(sd, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("change,words", [
    (lambda sd: sd.pop("vision_model.encoder.layers.1.mlp.fc2.bias"), "missing 1: vision_model.layers.1.mlp.fc2.bias"),
    (lambda sd: sd.update({"vision_model.extra.weight": torch.ones(2)}), "unexpected 1: vision_model.extra.weight"),
    (lambda sd: sd.update({"visual_projection.weight": torch.ones(5, 8)}),
     r"mis-shaped 1: visual_projection.weight \(checkpoint \(5, 8\), model \(6, 8\)\)"),
    (lambda sd: sd["vision_model.post_layernorm.weight"].fill_(float("nan")), "non-finite values"),
])
def test_bad_tensors_named(tmp_path, change, words):
    with pytest.raises(CheckpointError, match=words):
        load_clip(edited(tmp_path, change))


@pytest.mark.parametrize("path,words", [
    (FIX / "clip" / "text_encoder", "a CLIP text tower without text_projection"),
    (FIX / "clip" / "sd_v1_single_file.safetensors", "a Stable Diffusion single file"),
    (FIX / "dino" / "timm", "not a CLIP model"),
])
def test_files_without_a_projection_refused(path, words):
    with pytest.raises(CheckpointError, match=words):
        load_clip(path)


def test_vision_model_without_projection_refused(tmp_path):
    with pytest.raises(CheckpointError, match="a CLIP image tower without visual_projection"):
        load_clip(edited(tmp_path, lambda sd: sd.pop("visual_projection.weight")))


def test_check_clip_keys_tells_the_parts():
    keys = lambda folder: list(load_file(CLIPM / folder / "model.safetensors"))
    assert check_clip_keys(keys("l14"), source="l14") == (True, True)
    assert check_clip_keys(keys("b32_vision"), source="v") == (True, False)
    assert check_clip_keys(keys("b32_text"), source="t") == (False, True)


def test_bare_file_config_from_shapes(tmp_path):
    """A .safetensors alone: the architecture read off the shapes (heads 64 wide, as OpenAI's)."""
    sd = {k: torch.empty(s, device="meta") for k, s in
          json.loads((MANIFESTS / "clip_vit_l14_full.json").read_text())["tensors"].items()}
    ours = rename(sd, CLIP_KEYS)
    assert infer_vision_config(ours) == CLIPVisionConfig.vit_l14()


# ---- the real checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("manifest,vision,projection", [
    ("clip_vit_l14_full", CLIPVisionConfig.vit_l14(), 768),
    ("clip_vit_b32_full", CLIPVisionConfig.vit_b32(), 512),
])
def test_real_checkpoint_manifest_maps_exactly(manifest, vision, projection):
    """openai/clip-vit-large-patch14 and clip-vit-base-patch32: every tensor onto our CLIPModel, nothing left."""
    tensors = json.loads((MANIFESTS / f"{manifest}.json").read_text())["tensors"]
    ours = rename({k: torch.empty(s, device="meta") for k, s in tensors.items()}, CLIP_KEYS)
    text = CLIPTextConfig.vit_l14() if manifest.endswith("l14_full") else CLIPTextConfig.vit_l14(hidden_size=512,
                                                                                                  intermediate_size=2048,
                                                                                                  num_attention_heads=8)
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(text=text, vision=vision, projection_dim=projection))
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in ours.items()}, source=manifest)
