"""Preprocessing, equal to transformers' `load_image` + `ViTImageProcessor` (PIL path).

    file -> PIL image, EXIF orientation applied, converted to RGB       (common/images.py load_image)
         -> PIL bilinear resize to (height, width)                       (resample=2)
         -> uint8 * (1/255) computed in float64, stored as float32       (rescale)
         -> (x - mean) / std in float32, channels first                  (normalize)

The float64 rescale matters: transformers upcasts before multiplying, and doing the same keeps our
pixel values bit-identical to theirs.
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
        for name, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} {values}: expected 3 finite numbers, one per RGB channel")
        if 0 in self.image_std:
            raise ValueError(f"image_std {self.image_std}: a zero would divide by zero")
        if not math.isfinite(self.rescale_factor):
            raise ValueError(f"rescale_factor {self.rescale_factor}: must be a finite number")

    @classmethod
    def from_json(cls, path: str | Path) -> "PreprocessConfig":
        """Read a preprocessor_config.json; a value that cannot work is refused here, naming the file."""
        return config_from_json(path, cls.from_hf_dict)

    def to_hf_dict(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.size[0], "width": self.size[1]}, "resample": int(self.resample),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std}


def preprocess(images: list[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    """RGB PIL images -> pixel_values (B, 3, height, width) float32."""
    out = []
    for image in images:
        if config.do_resize:
            height, width = config.size
            image = image.resize((width, height), resample=config.resample)  # PIL takes (width, height)
        x = np.asarray(image)                                                 # (H, W, 3) uint8
        x = x.astype(np.float64) * config.rescale_factor if config.do_rescale else x.astype(np.float64)
        x = x.astype(np.float32)
        if config.do_normalize:
            mean = np.asarray(config.image_mean, dtype=np.float32)
            std = np.asarray(config.image_std, dtype=np.float32)
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))  # (3, H, W)
    return torch.stack(out)
