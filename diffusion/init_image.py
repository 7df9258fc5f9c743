"""The pictures of image to image and inpainting, turned into the tensors the pipeline takes, exactly as
diffusers' `VaeImageProcessor` turns them (`image_processor` and `mask_processor` of
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline), so that a seed gives diffusers' image.

    image = load_image("photo.png")                    # common/images.py: the one reader (RGB)
    height, width = default_size(image, None, None, factor=8)   # the image's size rounded down to 8
    pixels = image_to_pixels(image, height, width)     # (1, 3, H, W) in [-1, 1]
    mask = mask_to_pixels(load_image("mask.png"), height, width)   # (1, 1, H, W): 1 repaints, 0 keeps
    mask_latent = mask_to_latent_size(mask, factor=8)  # (1, 1, H/8, W/8), nearest neighbour

The steps, in diffusers' order: resize to (height, width) with Lanczos (PIL's filter, on the RGB picture,
even when the size is already right: then PIL copies it), to float32 / 255, then to [-1, 1] (the image)
or to grayscale (`convert("L")` after the resize) and binarised at 0.5 (the mask).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS   # VaeImageProcessor's default resample, "lanczos"


def default_size(image: Image.Image, height: int | None, width: int | None, *, factor: int) -> tuple[int, int]:
    """(height, width): those given, else the image's own, rounded down to a multiple of the VAE factor
    (VaeImageProcessor.get_default_height_width; each side on its own)."""
    height = image.height if height is None else height
    width = image.width if width is None else width
    return height - height % factor, width - width % factor


def image_to_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """An RGB picture -> (1, 3, height, width) float32 in [-1, 1], the VAE encoder's input
    (VaeImageProcessor.preprocess: resize, / 255, 2x - 1)."""
    resized = image.resize((width, height), resample=RESAMPLE)
    array = np.array(resized).astype(np.float32) / 255.0                    # (H, W, 3)
    pixels = torch.from_numpy(array[None].transpose(0, 3, 1, 2))            # (1, 3, H, W)
    return 2.0 * pixels - 1.0


def mask_to_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A mask picture -> (1, 1, height, width) float32 of 0 and 1: white (>= 0.5 after grayscale) repaints,
    black keeps (the pipeline's mask_processor: resize, convert("L"), / 255, binarise at 0.5)."""
    resized = image.resize((width, height), resample=RESAMPLE).convert("L")
    array = np.array(resized).astype(np.float32) / 255.0                    # (H, W)
    mask = torch.from_numpy(array[None, None])                               # (1, 1, H, W)
    return (mask >= 0.5).to(torch.float32)


def mask_to_latent_size(mask: torch.Tensor, *, factor: int) -> torch.Tensor:
    """(n, 1, H, W) pixel mask -> (n, 1, H/f, W/f), nearest neighbour (prepare_mask_latents' interpolate)."""
    return F.interpolate(mask, size=(mask.shape[-2] // factor, mask.shape[-1] // factor))
