"""The reference implementations (transformers, diffusers, peft) that the benchmarks race against, built in this
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


def add_dreambooth_lora(unet, *, rank: int, weight_dtype):
    """diffusers' examples/dreambooth/train_dreambooth_lora.py's set-up of its UNet for training: frozen,
    cast to its weight_dtype (bf16/fp16 from --mixed_precision), a peft adapter of rank r (alpha r,
    gaussian init) on its target modules; the adapter is upcast to fp32 only under fp16 (cast_training_params),
    so under bf16 it trains in bf16. Returns the parameters its AdamW moves."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    if weight_dtype == torch.float16:
        cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]
