"""Image loading and preprocessing, equal to transformers' `load_image` + `ViTImageProcessor` (PIL path).

    file -> PIL image, EXIF orientation applied, converted to RGB       (transformers' load_image)
         -> PIL bilinear resize to (height, width)                       (resample=2)
         -> uint8 * (1/255) computed in float64, stored as float32       (rescale)
         -> (x - mean) / std in float32, channels first                  (normalize)

The float64 rescale matters: transformers upcasts before multiplying, and doing the same keeps our
pixel values bit-identical to theirs.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageError(ValueError):
    """An input that is not a readable image. The message names it."""


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
        size = d.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size:
            raise ValueError(f"preprocessor_config.json: size {size} is not {{height, width}}; "
                             "only fixed-size resizing is supported for ViT")
        return cls(size=(int(size["height"]), int(size["width"])), resample=int(d.get("resample", 2)),
                   do_resize=d.get("do_resize", True), do_rescale=d.get("do_rescale", True),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=d.get("do_normalize", True),
                   image_mean=list(d.get("image_mean", [0.5] * 3)), image_std=list(d.get("image_std", [0.5] * 3)))

    @classmethod
    def from_json(cls, path: str | Path) -> "PreprocessConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.size[0], "width": self.size[1]}, "resample": int(self.resample),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std}


def load_image(source: str | Path | bytes | Image.Image, *, name: str | None = None) -> Image.Image:
    """A path, raw bytes or a PIL image -> an RGB PIL image, as transformers' `load_image` does.

    EXIF orientation is applied, then any mode (L, LA, P, RGBA, CMYK, I;16, ...) is converted with
    PIL's `convert("RGB")` (transparency is dropped, not composited, exactly as transformers does).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<image bytes>")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
        except OSError as e:
            raise ImageError(f"{label}: cannot read ({e.strerror or e})") from e
        if not data:
            raise ImageError(f"{label}: empty file (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so a truncated file fails here and not later
        except UnidentifiedImageError as e:  # PIL's own message names a BytesIO object, not the input
            raise ImageError(f"{label}: not a readable image (no image format recognised)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: not a readable image ({e})") from e
        except Image.DecompressionBombError as e:
            raise ImageError(f"{label}: image too large ({e})") from e
    try:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{label}: cannot convert to RGB ({e})") from e


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
