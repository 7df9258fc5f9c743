"""DINO's ViTs (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") as image
embedders: the [CLS] token after the final LayerNorm, the feature DINO's own k-NN evaluation reads and
DreamBooth's DINO score compares (Ruiz et al. 2023, sec. 4.1: ViT-S/16 DINO).

    image -> DINO_TRANSFORM -> (B, 3, 224, 224) -> our ViT with no head (vit/model.py) -> (B, D) [CLS]

The published checkpoints load through vit/weights.py's tables, as a backbone (`load_vit(labels=[])`):
  facebook/dino-vits16, dino-vitb16   transformers' ViTModel layout (`embeddings.`, `encoder.layer.N.`,
                                      `layernorm.`; no pooler in these files, and one would be dropped:
                                      DINO reads [CLS] itself); LayerNorm eps 1e-12, as their config.json says
  timm's vit_small_patch16_224.dino   timm's layout (`blocks.N.attn.qkv`), num_classes=0: no head; eps 1e-6,
                                      DINO's own value (each layout is run with its library's eps)
The original facebookresearch/dino `.pth` files hold timm's names (pickles: convert them first).
A classifier (a file with a head) is refused: its [CLS] token is not DINO's embedding.

DINO_TRANSFORM is DINO's evaluation transform (facebookresearch/dino eval_knn.py and eval_linear.py):

    transforms.Resize(256, interpolation=3)     shorter side to 256, PIL bicubic
    transforms.CenterCrop(224)                  offset round(margin / 2), half to even
    transforms.ToTensor()                       uint8 / 255
    transforms.Normalize(ImageNet mean, std)

torchvision's, bit for bit on PIL images (tests/test_dino.py). It is not the preprocessor_config.json that
transformers' conversion script (models/vit/convert_dino_to_pytorch.py) writes beside the converted
weights: that is a default ViTImageProcessor, which resizes the whole image to 224x224 without a crop.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from common.state_dict import CheckpointError, rename, safetensors_header
from vit.preprocess import ResizeCropConfig, preprocess_resize_crop
from vit.weights import KEYS, LoadedViT, detect_layout, load_vit

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DINO_TRANSFORM = ResizeCropConfig(shortest_edge=256, crop_size=(224, 224), resample=Image.Resampling.BICUBIC,
                                  crop_rounding="half_even", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def load_dino(path: str | Path) -> LoadedViT:
    """A DINO ViT (folder or .safetensors, either layout) as a backbone: `model(pixels)` is (B, D)."""
    return load_vit(path, labels=[])


def check_dino_file(weights: Path) -> str:
    """From the header alone: the layout of a ViT backbone file, or CheckpointError naming what it is instead
    (not a ViT; a classifier, whose [CLS] token is not DINO's embedding)."""
    header = safetensors_header(weights)[0]
    layout = detect_layout(dict.fromkeys(header), source=str(weights))
    ours = rename({k: k for k in header}, KEYS[layout])            # our name -> the file's name
    if "head.weight" in ours:
        outputs = header[ours["head.weight"]]["shape"][0]
        raise CheckpointError(f"{weights}: a ViT classifier (a head of {outputs} outputs), not a DINO backbone; "
                              "DINO's embedding is the [CLS] token of a ViT without a head "
                              "(facebook/dino-vits16, timm's vit_small_patch16_224.dino)")
    return layout


def dino_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (B, 3, 224, 224) by DINO's evaluation transform."""
    return preprocess_resize_crop(images, DINO_TRANSFORM)
