"""`python -m porting mapping --layout L`: every checkpoint key of a layout, our key, shape, transform, as TSV.

The tables are not written here: they are the loaders' own rules (diffusion/checkpoints/single_file.py,
clip/weights.py) run backwards by the inverter that saving uses (diffusion/checkpoints/save.py), and
vit/weights.py's template tables read in reverse, over our SD v1 / ViT-B/16 models' tensor names.
transform: `fuse_qkv` (three checkpoint tensors concatenated into our one), `squeeze_1x1` (a 1x1 conv
weight (C, C, 1, 1) is our Linear's (C, C)), `drop` (recognised and not loaded), or empty.
"""
from __future__ import annotations

import torch

LAYOUTS = ("transformers-vit", "timm-vit", "diffusers-unet", "ldm-unet", "diffusers-vae", "ldm-vae",
           "transformers-clip", "ldm-clip")


def _ours(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def table(layout: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """[(checkpoint key, our key, checkpoint shape, transform)] in our model's tensor order."""
    from common.state_dict import rename_keys
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    rows = []
    if layout.endswith("-vit"):
        from vit.model import ViTConfig, ViTForImageClassification
        from vit.weights import TIMM_KEYS, TRANSFORMERS_KEYS, rename
        with torch.device("meta"):
            ours = _ours(ViTForImageClassification(ViTConfig.b16()))
        table_ = TIMM_KEYS if layout == "timm-vit" else TRANSFORMERS_KEYS
        for key, shape in ours.items():
            if layout == "transformers-vit" and ".attn.qkv." in key:
                for part in "qkv":   # split_qkv's names, then the table backwards
                    theirs = next(iter(rename({key.replace(".qkv.", f".{part}."): 0}, table_, reverse=True)))
                    rows.append((theirs, key, (shape[0] // 3, *shape[1:]), "fuse_qkv"))
            else:
                rows.append((next(iter(rename({key: 0}, table_, reverse=True))), key, shape, ""))
        return rows
    if layout.endswith("-clip"):
        from clip.text_model import CLIPTextConfig, CLIPTextModel
        from clip.weights import text_rules
        from diffusion.checkpoints.save import TEXT_FOLDER_PREFIX, invert_rules
        from diffusion.checkpoints.single_file import TEXT_PREFIX
        with torch.device("meta"):
            ours = _ours(CLIPTextModel(CLIPTextConfig.vit_l14()))
        prefix = (TEXT_PREFIX if layout == "ldm-clip" else "") + TEXT_FOLDER_PREFIX
        names = rename_keys({k: k for k in ours}, invert_rules(text_rules(prefix)))
        rows = [(theirs, ours_key, ours[ours_key], "") for theirs, ours_key in names.items()]
        return rows + [(prefix + "embeddings.position_ids", "", (1, 77), "drop")]
    from diffusion.checkpoints import single_file
    from diffusion.checkpoints.save import invert_rules
    from diffusion.models.unet import UNet2DConditionModel, UNetConfig
    from diffusion.models.vae import AutoencoderKL, VAEConfig
    with torch.device("meta"):
        if layout.endswith("-unet"):
            config = UNetConfig.sd_v1()
            ours, rules = _ours(UNet2DConditionModel(config=config)), single_file.unet_rules(config)
        else:
            config = VAEConfig.sd_v1()
            ours, rules = _ours(AutoencoderKL(config=config)), single_file.vae_rules(config)
    if layout.startswith("diffusers"):      # our modules carry diffusers' names
        return [(k, k, shape, "") for k, shape in ours.items()]
    names = rename_keys({k: k for k in ours}, invert_rules(rules))
    for theirs, key in names.items():
        conv = layout == "ldm-vae" and single_file.VAE_ATTENTION_LINEAR.fullmatch(key) is not None
        rows.append((theirs, key, (*ours[key], 1, 1) if conv else ours[key], "squeeze_1x1" if conv else ""))
    return rows


def table_tsv(layout: str) -> str:
    lines = ["checkpoint_key\tour_key\tshape\ttransform"]
    lines += [f"{a}\t{b}\t{'x'.join(map(str, s))}\t{t}" for a, b, s, t in table(layout)]
    return "\n".join(lines) + "\n"
