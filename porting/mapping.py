"""`python -m porting mapping --layout L`: every checkpoint key of a layout, our key, shape, transform, as TSV.

The tables are not written here: they are the loaders' own key tables (vit/weights.py, clip/weights.py,
diffusion/checkpoints/single_file.py), read backwards over our SD v1 / ViT-B/16 models' tensor names,
as saving reads them. The diffusers layouts need no table: our UNet and VAE carry diffusers' names.
`openclip-text` is SD 2.x's single file's text tower (OpenCLIP ViT-H/14 under `cond_stage_model.model.`,
SD 2's 23 layers; the diffusers folder's is `transformers-clip`'s names at that size).
SDXL base: `sdxl-diffusers-unet` / `sdxl-ldm-unet` (sgm's names: label_emb, 10-deep transformers),
`sdxl-ldm-clip` (ViT-L/14 under `conditioner.embedders.0.transformer.text_model.`), `sdxl-openclip-text`
(ViT-bigG/14 under `conditioner.embedders.1.model.`, all 32 blocks and its text_projection) and
`sdxl-transformers-clip-projection` (the folder's text_encoder_2/: CLIPTextModelWithProjection); its first
text encoder's folder and its VAE are `transformers-clip`'s and the VAE layouts' names.
transform: `fuse_qkv` (three checkpoint tensors concatenated into our one), `split_in_proj` (one checkpoint
tensor's rows cut into our three: q, k, v in the order listed), `squeeze_1x1` (a 1x1 conv weight
(C, C, 1, 1) is our Linear's (C, C)), `transpose` (OpenCLIP's text_projection (D, P) is our Linear's (P, D)),
`drop` (recognised and not loaded), or empty.
"""
from __future__ import annotations

import torch

from common.state_dict import KeyTable

LAYOUTS = ("transformers-vit", "timm-vit", "diffusers-unet", "ldm-unet", "diffusers-vae", "ldm-vae",
           "transformers-clip", "ldm-clip", "openclip-text", "sdxl-diffusers-unet", "sdxl-ldm-unet", "sdxl-ldm-clip",
           "sdxl-openclip-text", "sdxl-transformers-clip-projection")
SAME_NAMES = KeyTable([("{rest}", "{rest}")])   # diffusers' layouts: every name is ours


def model_and_keys(layout: str) -> tuple[torch.nn.Module, KeyTable]:
    """Our model of the layout's component (on the meta device) and the layout's key table."""
    from clip.text_model import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from clip.weights import (FOLDER_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SINGLE_FILE_PREFIX, openclip_table,
                              text_table)
    from diffusion.checkpoints.single_file import unet_table, vae_table
    from diffusion.models.unet import UNet2DConditionModel, UNetConfig
    from diffusion.models.vae import AutoencoderKL, VAEConfig
    from vit.model import ViTConfig, ViTForImageClassification
    from vit.weights import TIMM_KEYS, TRANSFORMERS_KEYS

    with torch.device("meta"):
        if layout == "sdxl-openclip-text":
            config = CLIPTextConfig.open_clip_vit_bigg14()
            return CLIPTextModelWithProjection(config), openclip_table(config.num_hidden_layers, SDXL_OPENCLIP_PREFIX)
        if layout == "sdxl-transformers-clip-projection":
            return (CLIPTextModelWithProjection(CLIPTextConfig.open_clip_vit_bigg14()),
                    text_table(FOLDER_PREFIX, with_projection=True))
        if layout == "sdxl-ldm-clip":
            return CLIPTextModel(CLIPTextConfig.vit_l14()), text_table(SDXL_CLIP_PREFIX)
        if layout.startswith("sdxl-") and layout.endswith("-unet"):
            config = UNetConfig.sdxl()
            return UNet2DConditionModel(config=config), unet_table(config) if layout == "sdxl-ldm-unet" else SAME_NAMES
        if layout == "openclip-text":
            config = CLIPTextConfig.open_clip_vit_h14()
            return CLIPTextModel(config), openclip_table(config.num_hidden_layers)
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
        elif layout.endswith("openclip-text") and keys.name(key, reverse=True).endswith("#T"):
            rows.append((keys.name(key, reverse=True)[:-2], key, shape[::-1], "transpose"))
        elif layout.endswith("openclip-text") and "#" in keys.name(key, reverse=True):
            fused = keys.name(key, reverse=True).split("#")[0]          # in_proj_weight#q -> in_proj_weight
            rows.append((fused, key, (3 * shape[0], *shape[1:]), "split_in_proj"))
        else:
            rows.append((keys.name(key, reverse=True), key, shape, ""))
    if layout == "openclip-text":
        return rows + openclip_dropped(model, keys)
    if layout == "sdxl-openclip-text":   # SDXL runs the whole tower and its projection: only the temperature is left
        from clip.weights import SDXL_OPENCLIP_PREFIX
        return rows + [(SDXL_OPENCLIP_PREFIX + "logit_scale", "", (), "drop")]
    # The other text tables drop one tensor: position_ids, the positions 0..76 as a (1, 77) buffer.
    return rows + [(name, "", (1, model.config.max_position_embeddings), "drop") for name in keys.drop]


def openclip_dropped(model: torch.nn.Module, keys: KeyTable) -> list[tuple[str, str, tuple[int, ...], str]]:
    """What SD 2's file holds and SD 2 does not run: the tower's last block (its tensors shaped as block 0's),
    the projection into the joint space, the contrastive temperature. (An old open_clip's saved attn_mask
    buffer is dropped too where a file has one; the public files do not.)"""
    from clip.weights import OPENCLIP_PREFIX, fuse_in_proj
    width = model.config.hidden_size
    last = model.config.num_hidden_layers
    block = {keys.name(k, reverse=True): v for k, v in model.state_dict().items() if k.startswith("layers.0.")}
    block = fuse_in_proj({k.replace(".resblocks.0.", f".resblocks.{last}."): torch.empty(v.shape, device="meta")
                          for k, v in block.items()})
    return ([(k, "", tuple(v.shape), "drop") for k, v in block.items()]
            + [(OPENCLIP_PREFIX + "text_projection", "", (width, width), "drop"),
               (OPENCLIP_PREFIX + "logit_scale", "", (), "drop")])


def table_tsv(layout: str) -> str:
    lines = ["checkpoint_key\tour_key\tshape\ttransform"]
    lines += [f"{a}\t{b}\t{'x'.join(map(str, s))}\t{t}" for a, b, s, t in table(layout)]
    return "\n".join(lines) + "\n"
