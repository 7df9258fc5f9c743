"""DINO ViTs as image embedders (vit/dino.py) against transformers' ViTModel, timm and torchvision
(tests/fixtures/dino, made by tools/make_reference_eval.py)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.images import load_image
from common.state_dict import CheckpointError
from vit.dino import DINO_TRANSFORM, check_dino_file, dino_pixels, load_dino
from vit.model import ViTConfig, ViTForImageClassification
from vit.preprocess import ResizeCropConfig, crop_offset, preprocess_resize_crop, resized_size
from vit.weights import to_our_names

FIX = Path(__file__).parent / "fixtures"
DINO = FIX / "dino"
REF = load_file(DINO / "reference.safetensors")
with safe_open(DINO / "reference.safetensors", "pt") as f:
    IMAGE_NAMES = json.loads(f.metadata()["images"])
MANIFESTS = Path(__file__).parent / "manifests"


def images():
    return [load_image(FIX / "images" / name) for name in IMAGE_NAMES]


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---- the transform ---------------------------------------------------------------------------------
def test_transform_equals_torchvision_dino_eval():
    """Resize(256, bicubic), CenterCrop(224), ToTensor, Normalize(ImageNet), on PIL images of every mode."""
    pixels = dino_pixels(images())
    assert pixels.shape == (len(IMAGE_NAMES), 3, 224, 224)
    assert (pixels[:, :, 3::14, 5::14] - REF["pixels"]).abs().max().item() <= 1e-6


def test_crop_offsets_split_odd_margins_as_each_library():
    """torchvision: int(round(m / 2)), half to even; transformers: m // 2. They differ for m = 3, 7, 11, ..."""
    assert [crop_offset(m, "half_even") for m in (2, 3, 5, 7, 99)] == [1, 2, 2, 4, 50]
    assert [crop_offset(m, "floor") for m in (2, 3, 5, 7, 99)] == [1, 1, 2, 3, 49]
    assert resized_size(91, 72, 256) == (323, 256)                # long side truncated: int(256 * 91 / 72)
    # on such an image the two rules give pixels one column apart: the test above would see it
    image = Image.effect_noise((91, 72), 60).convert("RGB")
    floor = preprocess_resize_crop([image], dataclasses.replace(DINO_TRANSFORM, crop_rounding="floor"))
    assert not torch.equal(floor, dino_pixels([image]))


def test_transform_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="larger than the resized shorter side"):
        ResizeCropConfig(shortest_edge=200, crop_size=(224, 224))
    with pytest.raises(ValueError, match="crop_rounding"):
        ResizeCropConfig(crop_rounding="ceil")


# ---- the [CLS] embedding in both layouts -----------------------------------------------------------------
@pytest.mark.parametrize("folder,key,layout,eps", [("hf_vitmodel", "hf_cls", "transformers-vitmodel", 1e-12),
                                                   ("timm", "timm_cls", "timm", 1e-6)])
def test_cls_embedding_equals_reference(folder, key, layout, eps):
    loaded = load_dino(DINO / folder)
    config = loaded.model.config
    assert (loaded.layout, config.layer_norm_eps, config.num_heads, config.labels) == (layout, eps, 6, [])
    assert isinstance(loaded.model.head, torch.nn.Identity) and not loaded.new_head
    with torch.no_grad():
        cls = loaded.model(dino_pixels(images()))
    assert cls.shape == REF[key].shape == (len(IMAGE_NAMES), 24)
    assert relative(cls, REF[key]) <= 1e-5


def test_vitmodel_pooler_is_dropped():
    """google's in21k ViTModel files carry a pooler: recognised, not loaded; [CLS] is the LayerNorm's row 0."""
    ref = load_file(FIX / "vit" / "reference.safetensors")
    loaded = load_dino(FIX / "vit" / "hf_vitmodel")
    with torch.no_grad():
        cls = loaded.model(ref["pixel_values_32"])
    assert relative(cls, ref["hf_vitmodel_last_hidden_state"][:, 0]) <= 1e-5


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["hf_classifier", "timm"])
def test_classifier_refused_from_the_header(folder):
    path = FIX / "vit" / folder
    with pytest.raises(CheckpointError, match="a ViT classifier \\(a head of 7 outputs\\), not a DINO backbone"):
        check_dino_file(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="a ViT classifier"):
        load_dino(path)


def test_other_models_refused():
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        check_dino_file(FIX / "clip_model" / "l14" / "model.safetensors")


def test_missing_tensor_named(tmp_path):
    sd = load_file(DINO / "timm" / "model.safetensors")
    del sd["blocks.1.norm2.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((DINO / "timm" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing 1: blocks.1.norm2.weight"):
        load_dino(tmp_path)


# ---- the real checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("manifest,layout,eps", [("dino_vits16", "transformers-vitmodel", 1e-12),
                                                 ("timm_vit_small_patch16_224_dino", "timm", 1e-6)])
def test_real_checkpoint_manifest_maps_exactly(manifest, layout, eps):
    """facebook/dino-vits16 and timm's vit_small_patch16_224.dino: every tensor onto our ViT-S/16 backbone."""
    tensors = json.loads((MANIFESTS / f"{manifest}.json").read_text())["tensors"]
    ours = to_our_names({k: torch.empty(s, device="meta") for k, s in tensors.items()}, layout)
    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(hidden_size=384, num_heads=6, mlp_size=1536,
                                                    layer_norm_eps=eps, labels=[]))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
