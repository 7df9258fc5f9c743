"""CLIP's image preprocessing, equal to transformers' CLIPImageProcessor (its PIL path, the class of
that name in transformers 4; `CLIPImageProcessorPil` in transformers 5):

    RGB image (common/images.py load_image: EXIF orientation applied)
      -> shorter side to 224, PIL bicubic (the longer int(224 * long / short))
      -> centre crop 224 x 224, offset margin // 2
      -> uint8 / 255, (x - CLIP mean) / CLIP std

`vit/preprocess.py` `preprocess_resize_crop` does it; this module only says with which values: a model
folder's preprocessor_config.json when it has one, else CLIPImageProcessor's defaults at the model's
image size.

Two neighbours give slightly different pixels, measured on tests/fixtures/images: transformers 5's default
`CLIPImageProcessor` resizes torch tensors (torchvision), up to 2 uint8 levels (0.03 after normalising)
from PIL's bicubic; OpenAI's own `clip.load` preprocessing is torchvision on PIL, identical but for the
crop offset of an odd margin (round half to even instead of floor: one pixel).
"""
from __future__ import annotations

from pathlib import Path

from common.files import config_from_json
from vit.preprocess import ResizeCropConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]   # OpenAI's statistics of CLIP's training images
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def clip_preprocess_config(folder: Path | None, image_size: int) -> ResizeCropConfig:
    """The folder's preprocessor_config.json (its crop must be the model's image size), or CLIPImageProcessor's
    defaults (bicubic, CLIP mean/std) at `image_size`."""
    path = folder / PREPROCESSOR_CONFIG if folder is not None else None
    if path is None or not path.is_file():
        return ResizeCropConfig(shortest_edge=image_size, crop_size=(image_size, image_size),
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    config = config_from_json(path, lambda d: ResizeCropConfig.from_hf_dict(
        {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, **d}))
    if config.crop_size != (image_size, image_size):
        raise ValueError(f"{path}: crop_size {config.crop_size[0]}x{config.crop_size[1]}, but the model's image "
                         f"tower takes {image_size}x{image_size} images")
    return config
