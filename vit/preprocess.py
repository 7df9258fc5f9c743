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
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The formats read here (IMAGE_SUFFIXES are their file names), all decoded by Pillow's own code. Any
# other format is refused from its header, before decoding: EPS and PostScript in particular, which
# Pillow hands to Ghostscript, an external program, to rasterise. MPO is a camera JPEG with extra frames.
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
EXTERNAL_PROGRAMS = {"EPS": "Ghostscript"}   # formats Pillow reads only by running another program


class ImageError(ValueError):
    """An input that is not a readable image. The message names it."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the caller allows, told from its header before decoding."""


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
        try:
            return cls.from_hf_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as e:   # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.size[0], "width": self.size[1]}, "resample": int(self.resample),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std}


def load_image(source: str | Path | bytes | Image.Image, *, name: str | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """A path, raw bytes or a PIL image -> an RGB PIL image, as transformers' `load_image` does.

    EXIF orientation is applied, then any mode (L, LA, P, RGBA, CMYK, I;16, ...) is converted with
    PIL's `convert("RGB")` (transparency is dropped, not composited, exactly as transformers does).
    Files and bytes must be in one of FORMATS, and with `max_pixels` hold at most that many pixels
    (ImageTooLarge): both are checked from the header, before any pixel is decoded. The decoded file
    is closed before returning, so only the RGB image stays in memory.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<image bytes>")
    if isinstance(source, Image.Image):
        return _to_rgb(source, label)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or e})") from e
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:   # reads the header only
            _check_header(image, label, max_pixels)
            image.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb(image, label, in_place=True)
    except UnidentifiedImageError as e:  # PIL's own message names a BytesIO object, not the input
        raise ImageError(f"{label}: not a readable image: {len(data)} bytes beginning {data[:8]!r} are not an "
                         "image in any format Pillow reads") from e
    except Image.DecompressionBombError as e:     # over twice Pillow's own limit: refused by Image.open
        limit = f"; the limit here is {max_pixels} pixels" if max_pixels else ""
        raise ImageTooLarge(f"{label}: image too large ({e}{limit})") from e
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: not a readable image ({e})") from e


def _check_header(image: Image.Image, label: str, max_pixels: int | None) -> None:
    """The format and the pixel count, both known from the header alone."""
    if image.format not in FORMATS:
        program = EXTERNAL_PROGRAMS.get(image.format)
        why = f" (Pillow would run {program}, an external program, to read it)" if program else ""
        raise ImageError(f"{label}: {image.format} images are not read here{why}; "
                         f"send one of {', '.join(FORMATS)}")
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise ImageTooLarge(f"{label}: image too large: {width}x{height} = {width * height} pixels, over "
                            f"the limit of {max_pixels} pixels")


def _to_rgb(image: Image.Image, label: str, *, in_place: bool = False) -> Image.Image:
    """EXIF orientation applied, then convert("RGB"), in transformers' order. in_place transposes `image`
    itself (one just decoded here, which nobody else holds) instead of a copy: one full-size copy fewer."""
    try:
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
        else:
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
