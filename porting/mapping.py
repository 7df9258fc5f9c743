"""`python -m porting mapping --layout L`: every checkpoint key of a layout, our key, shape, transform, as TSV.

The tables are not written here: they are the loaders' own key tables (vit/weights.py, clip/weights.py,
diffusion/checkpoints/single_file.py), read backwards over our SD v1 / ViT-B/16 models' tensor names,
as saving reads them. The diffusers layouts need no table: our UNet and VAE carry diffusers' names.
transform: `fuse_qkv` (three checkpoint tensors concatenated into our one), `squeeze_1x1` (a 1x1 conv
weight (C, C, 1, 1) is our Linear's (C, C)), `drop` (recognised and not loaded), or empty.
"""
from __future__ import annotations

import torch

from common.state_dict import KeyTable

LAYOUTS = ("transformers-vit", "timm-vit", "diffusers-unet", "ldm-unet", "diffusers-vae", "ldm-vae",
           "transformers-clip", "ldm-clip")
SAME_NAMES = KeyTable([("{rest}", "{rest}")])   # diffusers' layouts: every name is ours


def model_and_keys(layout: str) -> tuple[torch.nn.Module, KeyTable]:
    """Our model of the layout's component (on the meta device) and the layout's key table."""
    from clip.text_model import CLIPTextConfig, CLIPTextModel
    from clip.weights import FOLDER_PREFIX, SINGLE_FILE_PREFIX, text_table
    from diffusion.checkpoints.single_file import unet_table, vae_table
    from diffusion.models.unet import UNet2DConditionModel, UNetConfig
    from diffusion.models.vae import AutoencoderKL, VAEConfig
    from vit.model import ViTConfig, ViTForImageClassification
    from vit.weights import TIMM_KEYS, TRANSFORMERS_KEYS

    with torch.device("meta"):
        if layout.endswith("-vit"):
            return ViTForImageClassification(ViTConfig.b16()), TIMM_KEYS if layout == "timm-vit" else TRANSFORMERS_KEYS
        if layout.endswith("-clip"):
            prefix = SINGLE_FILE_PREFIX if layout == "ldm-clip" else FOLDER_PREFIX
            return CLIPTextModel(CLIPTextConfig.vit_l14()), text_table(prefix)
        if layout.endswith("-unet"):
            config = UNetConfig.sd_v1()
            return UNet2DConditionModel(config=config), unet_table(config) if layout == "ldm-unet" else SAME_NAMES
        config = VAEConfig.sd_v1()
        return AutoencoderKL(config=config), vae_table(config) if layout == "ldm-vae" else SAME_NAMES


def table(layout: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """[(checkpoint key, our key, checkpoint shape, transform)] in our model's tensor order."""
    from diffusion.checkpoints.single_file import VAE_ATTENTION_LINEAR
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    model, keys = model_and_keys(layout)
    rows = []
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if layout == "transformers-vit" and ".attn.qkv." in key:
            for part in "qkv":   # split_qkv's names, then the table backwards
                theirs = keys.name(key.replace(".qkv.", f".{part}."), reverse=True)
                rows.append((theirs, key, (shape[0] // 3, *shape[1:]), "fuse_qkv"))
        elif layout == "ldm-vae" and VAE_ATTENTION_LINEAR.fullmatch(key):
            rows.append((keys.name(key, reverse=True), key, (*shape, 1, 1), "squeeze_1x1"))
        else:
            rows.append((keys.name(key, reverse=True), key, shape, ""))
    # Only the text tables drop a tensor: position_ids, the positions 0..76 as a (1, 77) buffer.
    return rows + [(name, "", (1, model.config.max_position_embeddings), "drop") for name in keys.drop]


def table_tsv(layout: str) -> str:
    lines = ["checkpoint_key\tour_key\tshape\ttransform"]
    lines += [f"{a}\t{b}\t{'x'.join(map(str, s))}\t{t}" for a, b, s, t in table(layout)]
    return "\n".join(lines) + "\n"
