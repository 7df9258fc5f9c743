"""What image to image and inpainting give the denoising loop of `diffusion/pipeline.py`: the pictures turned
into tensors exactly as diffusers' `VaeImageProcessor` turns them (`image_processor` and `mask_processor` of
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline), then encoded into an `ImageStart`
(`image_start`), with the generator's draws in diffusers' order, so that a seed gives diffusers' images.

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.schedule import randn

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


def default_strength(inpainting: bool) -> float:
    """Each diffusers pipeline's default: 0.8 for image to image (CompVis's img2img script: 0.75), 1.0 for inpainting."""
    return 1.0 if inpainting else 0.8


def start_step(steps: int, strength: float) -> int:
    """The steps of a `steps` schedule that image to image skips: diffusers' `get_timesteps`, which keeps the
    last int(steps * strength) (strength 1: all of them, from pure noise's level; 0.5: the second half)."""
    kept = min(int(steps * strength), steps)
    return max(steps - kept, 0)


@dataclass(frozen=True)
class ImageStart:
    """What image to image and inpainting give the denoising loop. Latents are the diffusion latents
    (the VAE's times scaling_factor), (n, C, h, w), on the loop's device."""
    start: int                                   # steps of the schedule skipped (`start_step`)
    image_latents: torch.Tensor | None           # z_0 of the init image (None: only a 9-channel UNet at strength 1)
    from_image: bool = True                      # start from z_0 noised to the run's first timestep (SDEdit);
                                                 # False: from pure noise (inpainting at strength 1, as diffusers)
    repaint_mask: torch.Tensor | None = None     # (n, 1, h, w), 1 repaints: with a 4-channel UNet the rest is set
                                                 # back to z_0 noised to the next step's level after every step
    unet_extra: torch.Tensor | None = None       # (n, 1 + C, h, w): the mask and the masked image's latents, the
                                                 # extra input channels of an inpainting UNet (9 = 4 + 1 + 4)


def encode_image(vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> (1, C, H/f, W/f) diffusion latents: a sample of the VAE posterior,
    its noise drawn from `generator` (one randn, as diffusers' `retrieve_latents`), times scaling_factor."""
    weights = next(vae.parameters())
    return vae.encode(pixels.to(weights.device, weights.dtype)).sample(generator) * vae.config.scaling_factor


def image_start(vae: torch.nn.Module, pixels: torch.Tensor, mask: torch.Tensor | None, *, batch: int, start: int,
                strength: float, unet_channels: int, generator: torch.Generator) -> tuple[torch.Tensor, ImageStart]:
    """The starting noise (batch, C, h, w) and the `ImageStart` of image to image (`mask` None) or inpainting,
    with the generator's draws in diffusers' order, so that a seed gives its images:
    - image to image (StableDiffusionImg2ImgPipeline): the image's posterior sample, then the noise;
    - inpainting (StableDiffusionInpaintPipeline): the image's posterior sample (not drawn by a 9-channel UNet
      at strength 1, which starts from pure noise and never uses z_0), the noise, then the masked image's.
    pixels: (1, 3, H, W) in [-1, 1] (`image_to_pixels`); mask: (1, 1, H, W), 1 repaints (`mask_to_pixels`)."""
    f = vae.config.spatial_factor
    device = next(vae.parameters()).device
    latent_shape = (batch, vae.config.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)
    if mask is None:
        image_latents = encode_image(vae, pixels, generator).repeat(batch, 1, 1, 1)
        noise = randn(latent_shape, generator=generator, device=device)
        return noise, ImageStart(start=start, image_latents=image_latents)
    inpainting_unet = unet_channels == 2 * vae.config.latent_channels + 1
    from_noise = strength == 1.0                     # diffusers' is_strength_max
    image_latents = None
    if not (inpainting_unet and from_noise):
        image_latents = encode_image(vae, pixels, generator).repeat(batch, 1, 1, 1)
    noise = randn(latent_shape, generator=generator, device=device)
    masked_pixels = pixels * (mask < 0.5)            # the repainted region grey (0 in [-1, 1])
    mask_latent = mask_to_latent_size(mask, factor=f).to(device).repeat(batch, 1, 1, 1)   # (batch, 1, h, w)
    if inpainting_unet:
        masked_latents = encode_image(vae, masked_pixels, generator).repeat(batch, 1, 1, 1)
        extra = torch.cat([mask_latent, masked_latents.to(mask_latent.dtype)], dim=1)   # (batch, 1 + C, h, w)
        return noise, ImageStart(start=start, image_latents=image_latents, from_image=not from_noise,
                                 unet_extra=extra)
    # diffusers encodes the masked image for a 4-channel UNet too, which never uses it; its posterior draw is
    # made here (without the encoder pass) so that the draws after it (DDIM's eta, Euler a) stay diffusers'.
    randn((1, *latent_shape[1:]), generator=generator, device=device, dtype=next(vae.parameters()).dtype)
    return noise, ImageStart(start=start, image_latents=image_latents, from_image=not from_noise,
                             repaint_mask=mask_latent)


def check_image_inputs(init_image: Any, mask_image: Any, strength: float | None, *, steps: int, unet_config: Any,
                       vae_config: Any) -> tuple[int, float | None]:
    """ValueError for what image to image and inpainting cannot run; returns the steps skipped (`start_step`)
    and the strength (its default: 0.8 for image to image, 1.0 for inpainting, as each diffusers pipeline)."""
    latent = vae_config.latent_channels
    if unet_config.in_channels not in (latent, 2 * latent + 1):
        raise ValueError(f"the UNet takes {unet_config.in_channels} input channels: {latent} (latents) or "
                         f"{2 * latent + 1} (an inpainting UNet: latents, mask, masked image's latents) are sampled")
    if mask_image is not None and init_image is None:
        raise ValueError("mask_image needs init_image: the mask says which part of that image is repainted")
    if unet_config.in_channels != latent and mask_image is None:
        raise ValueError(f"an inpainting UNet ({unet_config.in_channels} input channels) needs init_image and "
                         "mask_image: it samples a masked image's missing region")
    if init_image is None:
        if strength is not None:
            raise ValueError("strength applies to image to image and inpainting: give init_image")
        return 0, None
    strength = default_strength(mask_image is not None) if strength is None else strength
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength}: must be in (0, 1] (1: from pure noise; small: near the image)")
    start = start_step(steps, strength)
    if start >= steps:
        raise ValueError(f"strength={strength} with {steps} steps: int({steps} * {strength}) = 0 steps to run; "
                         "raise the strength or the steps")
    return start, strength
