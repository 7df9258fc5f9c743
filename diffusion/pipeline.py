"""Text to image with Stable Diffusion v1: prompt -> CLIP text states -> sampled latents -> VAE -> pixels.

Seed for seed equal to diffusers' `StableDiffusionPipeline` (same starting noise, same schedule, same
guidance, same uint8 conversion; tested on tiny random checkpoints within 2/255 per pixel).

    models = load_stable_diffusion("path/to/sd-v1-5")          # diffusion/checkpoints/load.py
    images = generate(models, ["a photo of a cat"], steps=50, guidance_scale=7.5, seed=42)
    # images: (N, H, W, 3) uint8; to_pil(images) for PIL images

The pieces, in order (each is a function below, so other scripts such as DreamBooth's class-image
generation can reuse them):
1. `encode_prompts`: tokenise to 77 ids and run the CLIP text encoder -> (B, 77, D) states.
2. `initial_latents`: x_T ~ N(0, I) of shape (n, C, H/f, W/f), drawn from a CPU generator so a seed
   gives the same image on any device.
3. `denoise`: the sampler loop (any sampler of `diffusion/samplers`) with classifier-free guidance
       eps = eps_uncond + scale * (eps_cond - eps_uncond)
   which is Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance") eq. 6,
   (1 + w) eps_cond - w eps_uncond, with w = scale - 1; both halves in one UNet call, the
   unconditional half first. The same combination is applied to whatever the UNet predicts (eps, v or
   x_0; a linear map of eps at each x_t, so the guided output is the guided eps in that parameterisation),
   as diffusers does; the sampler turns it into x_0 and eps (`predicted_x0_and_eps`).
4. `decode_to_uint8`: z / scaling_factor -> VAE decoder -> [-1, 1] -> uint8, as diffusers'
   `VaeImageProcessor.postprocess` does.

Image to image and inpainting (`generate(..., init_image=, mask_image=, strength=)`, equal to diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline) are inputs of the same loop, an
`ImageStart` (`image_start` builds it): the run skips the first `start_step(steps, strength)` steps of the
schedule and starts from the init image's latents z_0 noised to its first timestep (SDEdit, Meng et al.
2022); an inpainting UNet (9 input channels) also sees the mask and the masked image's latents at every
step, and with an ordinary 4-channel UNet the kept region is set back to z_0, noised to each next step's
level, after every step.

No NaN reaches an image: the UNet's first prediction and the decoded pixels are checked, and a model that
computes NaN or infinity (weights that overflow in their dtype, an absurd LoRA) raises `NonFiniteError`
instead of giving black images (uint8 conversion would turn NaN into 0).

SDXL (`models.is_sdxl`), as diffusers' `StableDiffusionXLPipeline`: `encode_prompts_sdxl` concatenates both text
encoders' penultimate states and takes the second's projected pooled output; `micro_conditioning` gives each
image's six size and crop numbers (by default original = target = the output size, crop (0, 0)); with no
negative prompt the unconditional half is zeros (`force_zeros_for_empty_prompt`, the pipeline's default); an
fp16 VAE decodes in fp32 (`force_upcast`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from clip.textual_inversion import expand_prompts
from common.precision import autocast as autocast_context
from diffusion.init_image import (ImageStart, check_image_inputs, default_size, image_start, image_to_pixels,
                                  mask_to_pixels)
from diffusion.samplers import Sampler, make_sampler
from diffusion.schedule import randn


class NonFiniteError(ValueError):
    """The model computed NaN or infinity; no image is made from it. The message says where."""


def _refuse_nonfinite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():          # one reduction (and, on a GPU, one sync)
        dtype = str(x.dtype).removeprefix("torch.")
        hint = "; fp16 overflows where bf16 and fp32 do not" if x.dtype == torch.float16 else ""
        raise NonFiniteError(f"{what} holds NaN or infinity (computed in {dtype}): something overflowed (the "
                             f"weights, a LoRA fused into them, or a guidance scale this large{hint}); "
                             "no image is made")


def size_multiple(unet_config: Any, vae_config: Any) -> int:
    """Image sides must be multiples of this: the VAE factor f times the UNet's 2^(levels - 1)
    down-samplings of the latent (SD v1: 8 * 8 = 64)."""
    return vae_config.spatial_factor * 2 ** (len(unet_config.block_out_channels) - 1)


def check_size(height: int, width: int, unet_config: Any, vae_config: Any, *, names=("height", "width")) -> None:
    """Raise ValueError (naming the flag or argument) for a size the UNet cannot take."""
    m = size_multiple(unet_config, vae_config)
    for name, value in zip(names, (height, width)):
        if value <= 0 or value % m:
            raise ValueError(f"{name}={value}: must be a positive multiple of {m} (the VAE factor "
                             f"{vae_config.spatial_factor} times 2^{len(unet_config.block_out_channels) - 1} "
                             "UNet down-samplings)")


# Peak activations of sampling, as maps of a model's first-level width (block_out_channels[0]) per pixel:
# measured on a CPU in fp32 (bench/sampling_memory.py), SD v1's UNet holds about 25 per latent pixel of
# each image of its batch (64x64 to 96x96 latents), its VAE decoder about 7 per output pixel (256 to 512
# pixels a side), and the tiny embedded model the same. Rounded up: the estimate is an upper bound.
UNET_MAPS, VAE_DECODER_MAPS = 32, 10


def sampling_memory(unet_config: Any, vae_config: Any, *, images: int, height: int, width: int,
                    dtype_bytes: int = 4, guidance: bool = True) -> int:
    """About how many bytes of activations `generate` needs at its peak for `images` images of
    height x width at once (the weights not counted): the UNet's on its batch of latents (twice the
    images with classifier-free guidance), or the VAE decoder's at full resolution after it, whichever
    is larger. Linear in the pixels: attention runs as torch's scaled_dot_product_attention, which on
    CPU and GPU never holds the (tokens x tokens) matrix."""
    f = vae_config.spatial_factor
    unet = ((2 if guidance else 1) * images * (height // f) * (width // f) * unet_config.block_out_channels[0]
            * dtype_bytes * UNET_MAPS)
    vae = images * height * width * vae_config.block_out_channels[0] * dtype_bytes * VAE_DECODER_MAPS
    return max(unet, vae)


def encode_prompts(text_encoder: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                   device: torch.device) -> torch.Tensor:
    """(B,) prompts -> (B, 77, D) CLIP text states (the last hidden state, after the final norm). The
    text encoder may be DDP-wrapped (training); gradients and autocast are the caller's to set."""
    ids = tokenizer(list(prompts), padding=True, max_length=tokenizer.model_max_length).to(device)  # (B, 77)
    return text_encoder(ids).last_hidden_state                           # (B, 77, D)


def encode_prompts_sdxl(text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], prompts: Sequence[str],
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning (Podell et al. 2023, sec. 2.1): (B,) prompts -> the two encoders' penultimate hidden
    states (before the final LayerNorm) concatenated, (B, 77, D1 + D2), and the pooled embedding, the second
    encoder's projected end-token state (B, P), as StableDiffusionXLPipeline.encode_prompt gives them."""
    states, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(list(prompts), padding=True, max_length=tokenizer.model_max_length).to(device)  # (B, 77)
        out = text_encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])                              # (B, 77, D_i), penultimate block
        pooled = out.text_embeds                                          # the last encoder's: (B, P)
    return torch.cat(states, dim=-1).to(states[-1].dtype), pooled


def micro_conditioning(height: int, width: int, *, original_size: tuple[int, int] | None = None,
                       crops_coords_top_left: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2) of one image, (6,): the original image's
    (height, width), the crop's (top, left), the target (height, width); StableDiffusionXLPipeline's defaults:
    original and target = the output size, crop (0, 0)."""
    original_size = (height, width) if original_size is None else tuple(original_size)
    target_size = (height, width) if target_size is None else tuple(target_size)
    return torch.tensor([*original_size, *crops_coords_top_left, *target_size], dtype=torch.float32)


def initial_latents(n: int, *, channels: int, height: int, width: int, factor: int,
                    generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """x_T: torch.randn((n, C, H/f, W/f), generator=generator), drawn on the generator's device
    (CPU for a seed) and moved to `device`, as diffusers' `prepare_latents` does."""
    return randn((n, channels, height // factor, width // factor), generator=generator, device=device)


def starting_latents(sampler: Sampler, noise: torch.Tensor, image: ImageStart | None) -> torch.Tensor:
    """x at the run's first timestep: pure noise scaled to the sampler's first level (x_T * init_noise_sigma),
    or, from an image, z_0 noised to that timestep by the sampler's own forward process (`add_noise`)."""
    if image is None or not image.from_image:
        return noise * sampler.init_noise_sigma
    return sampler.add_noise(image.image_latents.to(noise.dtype), noise, 0)


def keep_unmasked(sampler: Sampler, x: torch.Tensor, noise: torch.Tensor, image: ImageStart, *, step: int,
                  last: bool) -> torch.Tensor:
    """Inpainting with an ordinary 4-channel UNet (StableDiffusionInpaintPipeline's way): after step `step`,
    outside the mask the latents become z_0 noised to the next step's level (z_0 itself after the last step),
    so only the masked region is generated."""
    kept = image.image_latents if last else sampler.add_noise(image.image_latents, noise, step + 1)
    mask = image.repaint_mask.to(x.dtype)
    return (1 - mask) * kept.to(x.dtype) + mask * x


def denoise(unet: torch.nn.Module, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
            sampler: Sampler, steps: int, guidance_scale: float, generator: torch.Generator | None = None,
            progress: bool = True, image: ImageStart | None = None, cond_added: dict[str, torch.Tensor] | None = None,
            uncond_added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run the sampler from x_T (`latents`, (n, C, h, w), N(0, I)) to x_0 with classifier-free guidance.

    cond: (n, 77, D) text states per image; uncond: the same for the empty (or negative) prompt, or
    None to sample without guidance (one UNet call of batch n per step). The latents, the guidance and
    the sampler update are in the UNet weights' dtype, as in diffusers' pipeline with `torch_dtype`
    (its DPM-Solver and Euler schedulers, and ours, compute a step in fp32 and return that dtype):
    fp32 weights under autocast keep fp32 latents, their UNet output taken back to fp32. A stochastic
    sampler (DDIM with eta > 0, Euler a) draws its noise from `generator`. A first prediction holding NaN or
    infinity raises NonFiniteError.
    image: image to image or inpainting (`ImageStart`): the run is the schedule's last steps, from the init
    image's latents noised with `latents` as the noise; None: text to image, all steps from x_T.

    cond_added / uncond_added: SDXL's added conditioning of each half, {"text_embeds": (n, P), "time_ids":
    (n, 6)} (diffusers' `added_cond_kwargs`), passed to the UNet beside the states; None for SD v1/2.
    """
    dtype = next(unet.parameters()).dtype
    states = (cond if uncond is None else torch.cat([uncond, cond])).to(dtype)  # (2n, 77, D), unconditional first
    added = {} if cond_added is None else {
        name: (value if uncond is None else torch.cat([uncond_added[name], value])).to(dtype)
        for name, value in cond_added.items()}                            # (2n, P), (2n, 6): as the states
    timesteps = sampler.set_timesteps(steps, start=0 if image is None else image.start)
    noise = latents.to(dtype)
    x = starting_latents(sampler, noise, image)                        # (n, C, h, w)
    extra = None if image is None or image.unet_extra is None else image.unet_extra.to(dtype)
    if extra is not None and uncond is not None:
        extra = torch.cat([extra, extra])                              # (2n, 1 + C, h, w)
    if progress:
        from tqdm import tqdm
        timesteps = tqdm(timesteps, desc=f"{type(sampler).__name__} steps", unit="step")
    for i, t in enumerate(timesteps):
        x_in = x if uncond is None else torch.cat([x, x])            # (2n, C, h, w)
        x_in = sampler.scale_model_input(x_in, t)
        if extra is not None:    # an inpainting UNet's input: noisy latents, mask, masked image's latents
            x_in = torch.cat([x_in, extra], dim=1)                   # (2n, C + 1 + C, h, w)
        t_batch = t.to(x.device).expand(x_in.shape[0])               # (2n,), the sampler's dtype (int or float)
        model_output = unet(x_in, t_batch, states, **added).to(x.dtype)   # (2n, C, h, w): eps, v or x_0
        if i == 0:                                                   # a broken model stops here, not after all steps
            _refuse_nonfinite(model_output, "the UNet's prediction at the first step")
        if uncond is not None:
            uncond_output, cond_output = model_output.chunk(2)       # (n, C, h, w) each
            # Ho & Salimans eq. 6, w = scale - 1
            model_output = uncond_output + guidance_scale * (cond_output - uncond_output)
        x = sampler.step(model_output, t, x, generator=generator)
        if image is not None and image.repaint_mask is not None:     # a 4-channel UNet inpainting
            x = keep_unmasked(sampler, x, noise, image, step=i, last=i == len(timesteps) - 1)
    return x


def decode_to_uint8(vae: torch.nn.Module, latents: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """(n, C, h, w) diffusion latents -> (n, h*f, w*f, 3) uint8 images on the CPU.

    The diffusion model works on latents multiplied by `scaling_factor` (0.18215 for SD v1: it gives
    the latents unit variance; SDXL's VAE 0.13025); the decoder wants them unscaled. A new tensor, never an
    in-place divide. `upcast` (StableDiffusionXLPipeline's rule): an fp16 VAE whose config says force_upcast
    decodes in fp32 (SDXL's VAE overflows fp16), and is put back in fp16 afterwards (a lossless round trip).
    Decoded pixels holding NaN or infinity raise NonFiniteError (never a black image).
    """
    dtype = next(vae.parameters()).dtype
    if upcast and dtype == torch.float16 and vae.config.force_upcast:
        try:
            return decode_to_uint8(vae.float(), latents)
        finally:
            vae.half()
    image = vae.decode((latents / vae.config.scaling_factor).to(dtype))   # (n, 3, H, W), about [-1, 1]
    _refuse_nonfinite(image, "the decoded image")                       # NaN would become a black 0
    image = (image * 0.5 + 0.5).clamp(0, 1)                             # [0, 1], in the VAE's dtype as diffusers
    image = image.cpu().permute(0, 2, 3, 1).float()                     # (n, H, W, 3)
    return (image * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """(n, H, W, 3) uint8 -> list of PIL images."""
    from PIL import Image
    return [Image.fromarray(im.numpy()) for im in images]


def make_grid(images: Sequence, *, columns: int | None = None, padding: int = 2):
    """PIL images in rows of `columns` (default: all in one row), `padding` black pixels around each
    (as torchvision's make_grid with nrow=columns)."""
    from PIL import Image
    w, h = images[0].size
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (w + padding) + padding, rows * (h + padding) + padding))
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid.paste(image, (padding + column * (w + padding), padding + row * (h + padding)))
    return grid


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def generate(models: Any, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
             num_images_per_prompt: int = 1, steps: int = 50, eta: float | None = None, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, sampler: str = "ddim", autocast: str = "fp32",
             progress: bool = True, output: str = "uint8", init_image: Any = None, mask_image: Any = None,
             strength: float | None = None, original_size: tuple[int, int] | None = None,
             crops_coords_top_left: tuple[int, int] | None = None,
             target_size: tuple[int, int] | None = None) -> torch.Tensor | list:
    """Images for `prompts`, as diffusers' StableDiffusionPipeline gives them for
    `pipe(prompts, negative_prompt=..., num_images_per_prompt=..., num_inference_steps=steps, eta=eta,
    guidance_scale=..., height=..., width=..., generator=torch.Generator().manual_seed(seed))`
    with the same scheduler (`diffusion/samplers/__init__.py` names each sampler's diffusers scheduler).

    models: a `StableDiffusionModels` (unet, vae, text_encoder, tokenizer, scheduler_config), all on
        one device; nothing is moved or switched to eval mode here.
    prompts: one prompt or a list; the images come prompt by prompt, num_images_per_prompt each.
    negative_prompt: replaces the empty unconditional prompt: one string for all prompts or one per prompt.
    guidance_scale: classifier-free guidance when > 1; at <= 1 (as diffusers) the unconditional half
        is skipped and the negative prompt unused.
    seed / generator: give one. A seed means torch.Generator("cpu").manual_seed(seed); the starting
        latents are one randn((B, C, H/f, W/f)) from it, and DDIM with eta > 0 and Euler a draw their
        per-step noise from it.
    height / width: default unet sample_size * f; multiples of `size_multiple` (64 for SD v1).
    sampler: a name in `diffusion.samplers.SAMPLERS`: "ddim", "plms", "dpmpp_2m", "dpmpp_2m_karras",
        "euler", "euler_a"; `steps` is the number of UNet calls for all but PLMS (steps + 1).
    eta: DDIM's eta (None: 0); an error with any other sampler.
    The models run in their weights' dtype, as diffusers' pipeline does with `torch_dtype`: load them
        with `load_stable_diffusion(..., dtype=torch.bfloat16)` for bf16 (tested within 2/255 of
        diffusers with torch_dtype=torch.bfloat16).
    autocast: "fp32" (none) or "bf16"/"fp16": run fp32-weight models under torch.autocast in that
        dtype (sample.py --precision autocast; DreamBooth's validation images during mixed-precision training).
    output: "uint8" -> (B, H, W, 3) uint8 CPU tensor; "pil" -> list of PIL images.
    original_size / crops_coords_top_left / target_size: SDXL's micro-conditioning (`micro_conditioning`;
        the same numbers for the unconditional half, as the pipeline's negative_* defaults); an error for
        SD v1/2, whose UNet has none.
    SDXL: with no negative prompt, the unconditional states and pooled embedding are zeros when the model
        says force_zeros_for_empty_prompt (StableDiffusionXLPipeline's default).
    init_image: an RGB PIL image (common/images.py `load_image`): image to image, as diffusers'
        StableDiffusionImg2ImgPipeline(prompt, image=init_image, strength=...) gives it. Its size is
        height x width when given, else its own rounded down to a multiple of the VAE factor (resized with
        Lanczos, as VaeImageProcessor; diffusion/init_image.py).
    mask_image: with init_image: inpainting, as StableDiffusionInpaintPipeline(prompt, image=, mask_image=,
        height=, width=, strength=): white (>= 0.5 in grayscale) repaints, black keeps. A UNet of 9 input
        channels (an inpainting checkpoint) sees the mask and the masked image; an ordinary 4-channel UNet
        has its kept region set back after every step. A 9-channel UNet needs a mask.
    strength: in (0, 1]: the last int(steps * strength) steps are run (default 0.8 for image to image, 1.0
        for inpainting, as each diffusers pipeline).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: at least one prompt is needed")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt}: must be >= 1")
    if output not in ("uint8", "pil"):
        raise ValueError(f"output={output!r}: must be 'uint8' or 'pil'")
    if (seed is None) == (generator is None):
        raise ValueError("give exactly one of seed= and generator=")
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    unet_config, vae_config = models.unet.config, models.vae.config
    f = vae_config.spatial_factor
    start, strength = check_image_inputs(init_image, mask_image, strength, steps=steps, unet_config=unet_config,
                                         vae_config=vae_config)
    sdxl = getattr(models, "is_sdxl", False)
    if sdxl and init_image is not None:   # StableDiffusionXLImg2ImgPipeline/InpaintPipeline: not proven here yet
        raise ValueError("init_image: image to image and inpainting are built for SD v1 and 2.x; not for SDXL")
    if init_image is not None:
        height, width = default_size(init_image, height, width, factor=f)
    height = unet_config.sample_size * f if height is None else height
    width = unet_config.sample_size * f if width is None else width
    check_size(height, width, unet_config, vae_config)
    micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
    if not sdxl and any(v is not None for v in micro.values()):
        given = ", ".join(k for k, v in micro.items() if v is not None)
        raise ValueError(f"{given}: SDXL's micro-conditioning; this model's UNet has none (it is SD v1 or 2.x)")
    micro["crops_coords_top_left"] = crops_coords_top_left or (0, 0)
    the_sampler = make_sampler(models.scheduler_config, sampler, eta=eta)
    device = _module_device(models.unet)
    use_guidance = guidance_scale > 1

    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")

    # The words of multi-vector textual-inversion embeddings spelled out: "tok" -> "tok tok_1 ...", as
    # diffusers' maybe_convert_prompt (clip/textual_inversion.py); no change without added words.
    prompts, negatives = expand_prompts(prompts, models.tokenizer), expand_prompts(negatives, models.tokenizer)
    n = num_images_per_prompt
    cond_added = uncond_added = None
    with autocast_context(autocast, device):
        if not sdxl:
            states = encode_prompts(models.text_encoder, models.tokenizer,
                                    (negatives + prompts) if use_guidance else prompts, device)
            states = states.repeat_interleave(n, dim=0)                   # (k*B*n, 77, D), prompt by prompt
            uncond, cond = states.chunk(2) if use_guidance else (None, states)
        else:
            zeros = use_guidance and negative_prompt is None and models.force_zeros_for_empty_prompt
            texts = prompts if zeros or not use_guidance else negatives + prompts
            states, pooled = encode_prompts_sdxl(models.text_encoders, (models.tokenizer, models.tokenizer_2),
                                                 texts, device)
            states, pooled = states.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)
            if zeros:     # no negative prompt: zeros for the unconditional half, as the pipeline's default
                states, pooled = torch.cat([torch.zeros_like(states), states]), torch.cat([torch.zeros_like(pooled), pooled])
            (uncond, cond), (uncond_pooled, cond_pooled) = ((states.chunk(2), pooled.chunk(2)) if use_guidance
                                                            else ((None, states), (None, pooled)))
            time_ids = micro_conditioning(height, width, **micro).to(states.dtype).expand(cond.shape[0], -1)  # (B*n, 6)
            cond_added = {"text_embeds": cond_pooled, "time_ids": time_ids}
            uncond_added = {"text_embeds": uncond_pooled, "time_ids": time_ids} if use_guidance else None
        if init_image is None:
            latents, image = initial_latents(len(prompts) * n, channels=unet_config.in_channels, height=height,
                                             width=width, factor=f, generator=generator, device=device), None
        else:
            mask = None if mask_image is None else mask_to_pixels(mask_image, height, width)
            latents, image = image_start(models.vae, image_to_pixels(init_image, height, width), mask,
                                         batch=len(prompts) * n, start=start, strength=strength,
                                         unet_channels=unet_config.in_channels, generator=generator)
        latents = denoise(models.unet, latents, cond, uncond, sampler=the_sampler, steps=steps,
                          guidance_scale=guidance_scale, generator=generator, progress=progress, image=image,
                          cond_added=cond_added, uncond_added=uncond_added)
        images = decode_to_uint8(models.vae, latents, upcast=sdxl)
    return to_pil(images) if output == "pil" else images
