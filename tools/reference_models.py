"""The reference implementations (transformers, diffusers) that the benchmarks race against, built in this
one dev-only place, beside the fixture generators: nothing in the package, the tests or bench/ imports
those libraries itself. Install them with `pip install -r requirements-dev.txt`; each function imports its
library only when called, and `version(name)` says whether it is there without importing it.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path


def version(package: str) -> str | None:
    """The installed version of `package` ("transformers", "diffusers"), or None when it is absent."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ---- transformers ---------------------------------------------------------------------------------
def vit_classifier(folder: str | Path, **kwargs):
    """transformers' ViTForImageClassification read from a transformers-layout folder."""
    from transformers import ViTForImageClassification
    return ViTForImageClassification.from_pretrained(folder, **kwargs)


def clip_text_model(fields: dict):
    """transformers' CLIPTextModel, randomly initialised, with the given CLIPTextConfig fields."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**fields))


def clip_tokenizer(folder: str | Path):
    """transformers' CLIPTokenizer read from a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


# ---- diffusers ------------------------------------------------------------------------------------
def sd_v1_unet():
    """diffusers' UNet2DConditionModel with SD v1's config (its defaults, text width 768), random init."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(cross_attention_dim=768, sample_size=64)


def autoencoder_kl(**config):
    """diffusers' AutoencoderKL with the given config fields, random init."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(**config)
