"""Preprocessing, equal to transformers' `load_image` + `ViTImageProcessor` (PIL path).

    file -> PIL image, EXIF orientation applied, converted to RGB       (common/images.py load_image)
         -> PIL bilinear resize to (height, width)                       (resample=2)
         -> uint8 * (1/255) computed in float64, stored as float32       (rescale)
         -> (x - mean) / std in float32, channels first                  (normalize)

The float64 rescale matters: transformers upcasts before multiplying, and doing the same keeps our
pixel values bit-identical to theirs (and to torchvision's `ToTensor`, uint8 / 255 in float32: the
same 256 values).

The other common evaluation transform, `ResizeCropConfig` / `preprocess_resize_crop`, keeps the aspect
ratio: the shorter side resized to `shortest_edge`, then the centre cropped, then the same rescale and
normalize. It is DINO's evaluation transform (torchvision's `Resize(256, BICUBIC)`, `CenterCrop(224)`:
vit/dino.py) and `CLIPImageProcessor`'s (clip/preprocess.py); the two differ only in how an odd margin
is split (`crop_rounding`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.files import config_from_json


@dataclass
class PreprocessConfig:
    size: tuple[int, int] = (224, 224)          # (height, width) after resizing
    resample: int = Image.Resampling.BILINEAR   # PIL filter id; 2 = bilinear, as preprocessor_config.json
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_hf_dict(cls, d: dict) -> "PreprocessConfig":
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, not {type(d).__name__}")
        size = d.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or "height" not in size:
            raise ValueError(f"size {size} is not {{height, width}}; only fixed-size resizing is supported for ViT")
        config = cls(size=(int(size["height"]), int(size["width"])), resample=int(d.get("resample", 2)),
                     do_resize=d.get("do_resize", True), do_rescale=d.get("do_rescale", True),
                     rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                     do_normalize=d.get("do_normalize", True),
                     image_mean=list(d.get("image_mean", [0.5] * 3)), image_std=list(d.get("image_std", [0.5] * 3)))
        config.check()
        return config

    def check(self) -> None:
        """Refuse, at load, values that would fail or give NaN only when an image is preprocessed."""
        height, width = self.size
        if height < 1 or width < 1:
            raise ValueError(f"size {height}x{width} (height x width): both must be at least 1")
        check_rescale_normalize(self)

    @classmethod
    def from_json(cls, path: str | Path) -> "PreprocessConfig":
        """Read a preprocessor_config.json; a value that cannot work is refused here, naming the file."""
        return config_from_json(path, cls.from_hf_dict)

    def to_hf_dict(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.size[0], "width": self.size[1]}, "resample": int(self.resample),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std}


def check_rescale_normalize(config) -> None:
    """The values both configs share: 3 finite means and stds, no zero std, a finite rescale factor."""
    for name, values in (("image_mean", config.image_mean), ("image_std", config.image_std)):
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"{name} {values}: expected 3 finite numbers, one per RGB channel")
    if 0 in config.image_std:
        raise ValueError(f"image_std {config.image_std}: a zero would divide by zero")
    if not math.isfinite(config.rescale_factor):
        raise ValueError(f"rescale_factor {config.rescale_factor}: must be a finite number")


def preprocess(images: list[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """RGB PIL images -> pixel_values (B, 3, height, width) float32."""
    out = []
    for image in images:
        if config.do_resize:
            height, width = config.size
            image = image.resize((width, height), resample=config.resample)  # PIL takes (width, height)
        out.append(to_pixel_values(image, config))
    return torch.stack(out)


def to_pixel_values(image: Image.Image, config) -> torch.Tensor:
    """The rescale and normalize steps of either config: an RGB PIL image -> (3, H, W) float32."""
    x = np.asarray(image)                                                     # (H, W, 3) uint8
    x = x.astype(np.float64) * config.rescale_factor if config.do_rescale else x.astype(np.float64)
    x = x.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))     # (3, H, W)


# ---- resize the shorter side, crop the centre ----------------------------------------------------
CROP_ROUNDINGS = ("floor", "half_even")


@dataclass
class ResizeCropConfig:
    """Resize keeping the aspect ratio, crop the centre, rescale, normalize (transformers' shortest_edge
    + crop_size image processors, CLIPImageProcessor's keys; torchvision's Resize(int) + CenterCrop).

    The resized size is torchvision's and transformers' alike: the shorter side becomes `shortest_edge`,
    the longer `int(shortest_edge * long / short)` (truncated). The crop's offset along a side with an
    odd margin m is where the two libraries differ: transformers' `center_crop` takes m // 2 ("floor"),
    torchvision's `int(round(m / 2))`, Python's round half to even ("half_even"), so a margin of 3 puts
    the crop at 1 in transformers and at 2 in torchvision (one pixel apart).
    """
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)      # (height, width)
    resample: int = Image.Resampling.BICUBIC    # PIL filter id; 3 = bicubic
    crop_rounding: str = "floor"                # "floor" (transformers) or "half_even" (torchvision)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        height, width = self.crop_size
        if not all(isinstance(v, int) and v >= 1 for v in (self.shortest_edge, height, width)):
            raise ValueError(f"shortest_edge {self.shortest_edge} and crop_size {self.crop_size}: must be "
                             "integers >= 1")
        if max(height, width) > self.shortest_edge:
            raise ValueError(f"crop_size {height}x{width} is larger than the resized shorter side "
                             f"{self.shortest_edge}: the crop would need padding, which is not supported")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding {self.crop_rounding!r}: choose one of {', '.join(CROP_ROUNDINGS)}")
        check_rescale_normalize(self)

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "ResizeCropConfig":
        """From a CLIPImageProcessor-style preprocessor_config.json: size {"shortest_edge": N} (or an int, as
        old files write it), crop_size {"height", "width"} (or an int); the rest as in PreprocessConfig."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, not {type(d).__name__}")
        for key in ("do_resize", "do_center_crop"):
            if d.get(key, True) is not True:
                raise ValueError(f"{key} {d[key]!r}: only resizing and center cropping is supported here")
        size, crop = d.get("size", 224), d.get("crop_size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"size {size}: expected {{\"shortest_edge\": N}} (resize keeping the aspect ratio)")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            crop = (crop.get("height"), crop.get("width"))
        elif isinstance(crop, int):
            crop = (crop, crop)
        values = dict(shortest_edge=size, crop_size=tuple(crop), resample=int(d.get("resample", 3)),
                      do_rescale=d.get("do_rescale", True), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                      do_normalize=d.get("do_normalize", True),
                      image_mean=list(d.get("image_mean", [0.5] * 3)), image_std=list(d.get("image_std", [0.5] * 3)))
        return cls(**{**values, **overrides})


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shortest_edge`, the longer truncated (both libraries' rule)."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def crop_offset(margin: int, rounding: str) -> int:
    return margin // 2 if rounding == "floor" else int(round(margin / 2))


def preprocess_resize_crop(images: list[Image.Image], config: ResizeCropConfig) -> torch.Tensor:
    """RGB PIL images -> pixel_values (B, 3, crop height, crop width) float32."""
    out = []
    crop_height, crop_width = config.crop_size
    for image in images:
        size = resized_size(*image.size, config.shortest_edge)
        if size != image.size:              # both libraries leave an image of the right size untouched
            image = image.resize(size, resample=config.resample)
        top = crop_offset(size[1] - crop_height, config.crop_rounding)
        left = crop_offset(size[0] - crop_width, config.crop_rounding)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        out.append(to_pixel_values(image, config))
    return torch.stack(out)
