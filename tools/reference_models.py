"""The reference implementations (transformers, diffusers, peft) that the benchmarks race against, built in this
one dev-only place, beside the fixture generators: nothing in the package, the tests or bench/ imports
those libraries itself. The whole-process benches run the reference side as its users run it, from here:
transformers' image-classification pipeline, and diffusers' DreamBooth example script's loop (that script
is not installed with diffusers, so a compact reproduction of it lives here). Install them with `pip install -r requirements-dev.txt`; each function imports its
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


# ---- transformers' image-classification pipeline (bench/predict_emotion.py) ------------------------
def write_vit_classifier(folder: str | Path, *, labels: list[str]) -> Path:
    """A full-size ViT-B/16 classifier folder (224x224, 16x16 patches, 12 layers of width 768: transformers'
    ViTConfig defaults, the size of dima806's emotion model) with random weights and dima806's preprocessing
    (resize to 224x224, mean = std = 0.5), written once by transformers' own save_pretrained."""
    import shutil

    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    scratch = folder.with_name(folder.name + ".partial")     # renamed into place when complete
    shutil.rmtree(scratch, ignore_errors=True)
    torch.manual_seed(0)
    config = ViTConfig(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(scratch)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=2).save_pretrained(scratch)
    scratch.rename(folder)
    return folder


def classify_with_pipeline(model: str, images: str, out: str, dtype: str, batch_size: str) -> None:
    """What transformers' docs show for classifying images: `pipeline("image-classification", model=FOLDER)`
    called on a list of image paths (it opens them itself: EXIF orientation, RGB), `batch_size` images per
    forward pass, top 5 labels; written as predict_emotion.py writes them, one JSON line per image into `out`.
    Arguments are strings: bench/predict_emotion.py runs it as `python -c` with sys.argv."""
    import json

    import torch
    from transformers import pipeline
    files = sorted(str(p) for p in Path(images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    classifier = pipeline("image-classification", model=model, device="cpu",
                          dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    results = classifier(files, batch_size=int(batch_size), top_k=5)
    with open(out, "w") as f:
        for path, predictions in zip(files, results):
            f.write(json.dumps({"image": path, "predictions": predictions}) + "\n")

