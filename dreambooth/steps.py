"""The named steps of train_dreambooth.py's loop, in the order the loop calls them:

    models = load_models(...)                      the base model, checked and on the device
    params = trainable_parameters(models, ...)     what the optimizer moves (LoRA plugs in here)
    batch  = make_batch(...)                        instance (+ class) crops and their generators (SDXL: and
                                                   each crop's size and crop conditioning, `Batch.time_ids`)
    text   = encode(...)                            the prompts' text states (SDXL: both towers, and the pooled
                                                   embedding; diffusion/pipeline.py)
    added  = added_conditioning(text, batch)       SDXL's added conditioning of the UNet (None for SD v1/2)
    pred, target, t = denoising_prediction(...)    VAE latents (LatentCache: once per crop), forward process,
                                                   one UNet call; its random numbers (`Draws`) drawn, or given
    loss = denoising_loss(pred, target, ...)       the MSE (with min-SNR weighting if asked)
    grad_norm = optimizer_step(...)                 unscale, clip, step, zero (common/training.py)
    training_state / restore_training_state         the whole training state, for exact resume

Every random draw of one training example (its crop, latent sample, noise and timestep) comes from
that example's own generator (`dreambooth.data.example_generator`), so one process and N processes
draw the same numbers, and a resumed run draws what the uninterrupted run would have.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.precision import DTYPES, autocast
from dreambooth.data import crop, example_generator

OFFSET_NOISE_SCALE = 0.1        # diffusers' --offset_noise strength (Guttenberg 2023, "Diffusion with Offset Noise")


def load_models(path: str, *, config_dir: str | None, resolution: int, device: torch.device, precision: str,
                dtype: torch.dtype = torch.float32, variant: str | None = None, rank: int | None = None,
                train_text_encoder: bool = False, prediction_type: str | None = None):
    """The base model's parts on `device`, weights in `dtype`, with --resolution (and --rank, against the
    layers it would adapt) checked against the architecture (a .ckpt's is known only once it is read) and
    the speed transformations that measured faster for computing in `precision` (diffusion/speed.py).
    Returns (models, the layouts chosen)."""
    from diffusion import lora
    from diffusion.checkpoints.load import load_stable_diffusion
    from diffusion.speed import arrange_for_speed
    from diffusion.pipeline import check_size
    models = load_stable_diffusion(path, config_dir=config_dir, dtype=dtype, variant=variant,
                                   prediction_type=prediction_type)
    check_size(resolution, resolution, models.unet.config, models.vae.config, names=("--resolution", "--resolution"))
    if rank is None and models.is_sdxl:     # a .ckpt's family is known only here (check_model_size: the others)
        from dreambooth.memory import sdxl_full_fine_tuning_refusal
        raise ValueError(sdxl_full_fine_tuning_refusal(models.unet.config))
    if rank is not None:
        lora.check_rank(models.unet, lora.UNET_TARGETS, rank, flag="--rank")
        for text_encoder in models.text_encoders if train_text_encoder else ():
            lora.check_rank(text_encoder, lora.TEXT_ENCODER_TARGETS, rank, flag="--rank")
    for m in (models.unet, models.vae, *models.text_encoders):
        m.to(device)
    return models, arrange_for_speed(models, device=device, precision=precision)


def trainable_parameters(models, *, train_text_encoder: bool, gradient_checkpointing: bool,
                         rank: int | None = None, precision: str = "fp32") -> list:
    """Full fine-tuning: every UNet weight (and every text-encoder weight with --train_text_encoder),
    in fp32 (master weights; autocast runs the forward in `precision`); the VAE is frozen, in eval mode.

    With `rank` (--rank), LoRA instead, as diffusers' train_dreambooth_lora.py: every weight is frozen
    and stored in `precision` (its weight_dtype: bf16/fp16 halve the frozen model's memory, and frozen
    weights need no fp32 master copy), the four projections of every UNet attention (and, with
    --train_text_encoder, of every text-encoder attention: SDXL's two) get a rank-r update with alpha = r,
    kept in fp32 (diffusion/lora.py), and only those updates train. SDXL's VAE stays in fp32, as
    train_dreambooth_lora_sdxl.py keeps it ("to avoid NaN losses": its activations overflow fp16).

    Returns the UNet's parameters, then the text encoders' (`parameter_groups` splits them there)."""
    from diffusion import lora
    unet, vae, text_encoders = models.unet, models.vae, models.text_encoders
    vae.requires_grad_(False)
    unet.requires_grad_(rank is None)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(train_text_encoder and rank is None)
    if rank is not None:
        fp32_vae = models.is_sdxl and vae.config.force_upcast
        for frozen in (unet, *([] if fp32_vae else [vae]), *text_encoders):
            frozen.to(DTYPES[precision])              # keeps each weight's memory layout (diffusion/speed.py)
        if fp32_vae:
            vae.to(torch.float32)                     # SDXL's (a no-op but for a .ckpt read in `precision`)
        lora.inject(unet, lora.UNET_TARGETS, rank=rank, alpha=rank)
        for text_encoder in text_encoders if train_text_encoder else ():
            lora.inject(text_encoder, lora.TEXT_ENCODER_TARGETS, rank=rank, alpha=rank)
    unet.train()
    for text_encoder in text_encoders:
        text_encoder.train(train_text_encoder)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in text_encoders if train_text_encoder else ():
            text_encoder.enable_gradient_checkpointing()
    return [p for m in (unet, *(text_encoders if train_text_encoder else ())) for p in m.parameters()
            if p.requires_grad]


def parameter_groups(models, params: list, *, lr: float, weight_decay: float, text_encoder_lr: float | None = None,
                     text_encoder_weight_decay: float | None = None) -> list[dict]:
    """AdamW's parameter groups: one, or with a text encoder's own learning rate or weight decay (SDXL's
    --text_encoder_lr and --adam_weight_decay_text_encoder, as train_dreambooth_lora_sdxl.py's groups) the
    UNet's and the text encoders'. `lr_scale` is a group's share of the scheduled learning rate
    (common.training.optimizer_step): diffusers' schedule multiplies every group's own rate by one factor."""
    if text_encoder_lr is None and text_encoder_weight_decay is None:
        return [{"params": params, "weight_decay": weight_decay}]
    unet_ids = {id(p) for p in models.unet.parameters()}
    text = [p for p in params if id(p) not in unet_ids]
    groups = [{"params": [p for p in params if id(p) in unet_ids], "weight_decay": weight_decay}]
    if text:
        own_lr = lr if text_encoder_lr is None else text_encoder_lr
        groups.append({"params": text, "lr_scale": own_lr / lr,
                       "weight_decay": weight_decay if text_encoder_weight_decay is None else text_encoder_weight_decay})
    return groups


@dataclass
class Batch:
    pixels: torch.Tensor              # (N, 3, r, r) in [-1, 1]: the instance crops, then the class crops
    generators: list                  # N generators: example i's for its instance and its class image
    crops: list                       # N (source, image index, top, left): which crop each row is
    time_ids: torch.Tensor | None = None   # SDXL: (N, 6) each crop's micro-conditioning (`micro_conditioning`)


def make_batch(positions: range, *, order: torch.Tensor, epoch: int, seed: int, instance_images: list,
               class_images: list, resolution: int, center_crop: bool, original_sizes: dict | None = None) -> Batch:
    """The examples at `positions` of the epoch's `order`: example k pairs instance image k % n_inst
    with class image k % n_class (as diffusers' DreamBooth dataset does); the class crops (prior
    preservation) come after the instance crops, so one UNet call denoises both.

    original_sizes (SDXL): {"instance": [(h, w) of each instance image file], "class": [...]}: each crop's
    micro-conditioning (Podell et al. 2023, sec. 2.2) is its image's size before resizing, the crop's
    top-left in the resized image, and the target size `resolution` square, as train_dreambooth_lora_sdxl.py's
    dataset computes them for its instance images (its class rows repeat their instance's: see docs/sdxl.md)."""
    from diffusion.pipeline import micro_conditioning
    generators = [example_generator(seed, epoch, k) for k in positions]
    ids = [int(order[k]) for k in positions]
    sources = [("instance", instance_images)] + ([("class", class_images)] if class_images else [])
    pixels, crops, time_ids = [], [], []
    for source, images in sources:
        for i, g in zip(ids, generators):
            square, (top, left) = crop(images[i % len(images)], resolution, center=center_crop, generator=g)
            pixels.append(square)
            crops.append((source, i % len(images), top, left))
            if original_sizes is not None:
                time_ids.append(micro_conditioning(resolution, resolution, crops_coords_top_left=(top, left),
                                                   original_size=original_sizes[source][i % len(images)]))
    return Batch(pixels=torch.stack(pixels), generators=generators * len(sources), crops=crops,
                 time_ids=torch.stack(time_ids) if time_ids else None)                  # time_ids: (N, 6)


def encode(text_encoders, models, prompts: list[str], device: torch.device) -> tuple:
    """The prompts' text conditioning, (states (N, 77, D), pooled (N, P) or None): SD v1/2's one CLIP tower
    (`encode_prompts`), or SDXL's two (`encode_prompts_sdxl`: the penultimate states of both concatenated, and
    the second tower's projected pooled embedding), as the training scripts' encode_prompt computes them.
    `text_encoders` are the models' own, or their DDP wrappers."""
    from diffusion.pipeline import encode_prompts, encode_prompts_sdxl
    if models.is_sdxl:
        return encode_prompts_sdxl(text_encoders, (models.tokenizer, models.tokenizer_2), prompts, device)
    return encode_prompts(text_encoders[0], models.tokenizer, prompts, device), None


def added_conditioning(pooled: torch.Tensor | None, batch: Batch) -> dict | None:
    """SDXL's added conditioning of the UNet (its `addition_embed_type: text_time`), diffusers'
    `added_cond_kwargs`: the pooled text embedding and each crop's size and crop ids; None for SD v1/2."""
    if pooled is None:
        return None
    return {"text_embeds": pooled, "time_ids": batch.time_ids.to(pooled.device)}


class LatentCache:
    """--cache_latents: the frozen VAE's posterior q(z|x) of each crop, computed the first time the crop is
    drawn and kept (each step still draws a fresh sample z from it, as without the cache), so the encoder
    runs once per distinct crop instead of on every example of every step. With square images or
    --center_crop that is once per image; random crops of larger images add an entry per distinct offset.

    Each crop is encoded alone, so its posterior does not depend on which crops shared its first batch
    (a resumed run, or N processes, get the same numbers). Batched encoding differs from this in the last
    bits (about 1e-6 of the latents on a CPU), which is why a run with the cache is close to one without,
    not bit-identical."""

    def __init__(self, vae, precision: str):
        self.vae, self.precision, self.moments = vae, precision, {}   # crop -> (1, 2L, h, w) moments

    @torch.no_grad()
    def posterior(self, batch: Batch):
        from diffusion.models.vae import DiagonalGaussian
        device = batch.pixels.device
        for key, pixels in zip(batch.crops, batch.pixels):
            if key not in self.moments:
                with autocast(self.precision, device):
                    self.moments[key] = self.vae.encode(pixels[None]).moments
        return DiagonalGaussian(torch.cat([self.moments[key] for key in batch.crops]))


@dataclass
class Draws:
    """The random numbers of one micro-batch's forward process, row i for row i of the batch: drawn by
    `draw` from the examples' generators, or given to `denoising_prediction` from outside (a reference
    script's own draws, for a test or a port)."""
    posterior: torch.Tensor              # (N, L, h, w) ~ N(0, I): the posterior sample is mean + std * this
    noise: torch.Tensor                  # (N, L, h, w) ~ N(0, I): the forward process's epsilon
    timesteps: torch.Tensor              # (N,) int64 in [0, T)
    offset: torch.Tensor | None = None   # (N, L, 1, 1) ~ N(0, I): --offset_noise's per-channel constants


def draw(generators: list, posterior, *, num_train_timesteps: int, offset_noise: bool) -> Draws:
    """Each example's draws from its own generator, in this order: its posterior sample's noise (as
    `DiagonalGaussian.draw`), the noise, the offset noise (with --offset_noise), the timestep."""
    z = posterior.draw(generators)                                             # (N, L, h, w)
    channels, shape = z.shape[1], tuple(z.shape[1:])
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators])
    offset = (torch.cat([torch.randn((1, channels, 1, 1), generator=g) for g in generators]) if offset_noise
              else None)
    t = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])
    return Draws(posterior=z, noise=noise, timesteps=t, offset=offset)


def denoising_prediction(unet, vae, schedule, batch: Batch, states: torch.Tensor, *, precision: str,
                         offset_noise: bool, latent_cache: LatentCache | None = None, draws: Draws | None = None,
                         added: dict | None = None, vae_precision: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, target, t) for one batch: the images' latents, noised to a random timestep t each
    ((N,)), and what the UNet should predict there (the noise, or v for v-prediction models), (N, C, h, w).
    The random numbers are `draws` when given, else drawn from the batch's generators (`draw`).
    added: SDXL's added conditioning (`added_conditioning`). vae_precision: the VAE's, if not `precision`
    (SDXL's runs in fp32)."""
    device = batch.pixels.device
    with torch.no_grad(), autocast(vae_precision or precision, device):
        posterior = latent_cache.posterior(batch) if latent_cache is not None else vae.encode(batch.pixels)
    if draws is None:
        draws = draw(batch.generators, posterior, num_train_timesteps=schedule.num_train_timesteps,
                     offset_noise=offset_noise)
    # Latents: a sample of the frozen VAE's posterior q(z|x), times the scaling factor (0.18215 for SD v1).
    latents = posterior.sample(noise=draws.posterior).float() * vae.config.scaling_factor   # (N, L, r/f, r/f)
    noise = draws.noise
    if offset_noise:     # a per-image, per-channel constant: lets the model shift brightness
        if draws.offset is None:
            raise ValueError("offset_noise: the draws given have no offset (Draws.offset)")
        noise = noise + OFFSET_NOISE_SCALE * draws.offset
    noise, t = noise.to(device, torch.float32), draws.timesteps.to(device)
    noisy = schedule.add_noise(latents, noise, t)                              # DDPM eq. 4, t: (N,)
    with autocast(precision, device):
        pred = unet(noisy, t, states, **(added or {}))                        # (N, C, h, w), one UNet call
    if schedule.config.prediction_type == "v_prediction":
        return pred, schedule.get_velocity(latents, noise, t), t
    return pred, noise, t


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor | None = None, *, schedule=None,
                   snr_gamma: float | None = None, snr_v_paper: bool = False) -> torch.Tensor:
    """The mean squared error of a batch of predictions, in fp32 (a scalar), as diffusers'
    `F.mse_loss(model_pred.float(), target.float(), reduction="mean")`.

    With `snr_gamma`: the mean of each image's MSE times its min-SNR-gamma weight (Hang et al. 2023,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy", sec. 3.4: min(SNR, gamma) on the x_0
    loss), SNR(t) = a_t / (1 - a_t), as diffusers' train_dreambooth.py writes it: min(SNR, gamma) / SNR
    on the epsilon loss (the paper's weight, sec. 4.2) and min(SNR, gamma) / SNR + 1 on the v loss (the
    script's, "floored at one"); with `snr_v_paper` the paper's min(SNR, gamma) / (SNR + 1) on the v loss
    instead, as diffusers' train_text_to_image.py."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))   # (N,)
    a = schedule.alphas_cumprod.to(per_image.device)[t]
    snr = a / (1 - a)
    weight = torch.clamp(snr, max=snr_gamma) / snr                                          # (N,)
    if schedule.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1) if snr_v_paper else weight + 1
    return (per_image * weight).mean()


def training_state(models, optimizer, scaler, *, step: int, rng: dict, run_settings: dict,
                   train_text_encoder: bool, lora_only: bool = False) -> dict:
    """Everything a resumed run needs to continue bit for bit (the data stream follows from the step).
    With `lora_only` the models' weights are the LoRA updates alone: the rest is the frozen base."""
    from diffusion.lora import lora_state_dict
    weights = lora_state_dict if lora_only else (lambda m: m.state_dict())
    state = {"unet": weights(models.unet), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "rng": rng, "run_settings": run_settings}
    if train_text_encoder:
        state |= {part: weights(getattr(models, part)) for part in text_parts(models)}
    return state


def text_parts(models) -> tuple[str, ...]:
    """The text encoders' names: ("text_encoder",), or SDXL's ("text_encoder", "text_encoder_2")."""
    return ("text_encoder", "text_encoder_2") if models.is_sdxl else ("text_encoder",)


def restore_training_state(state: dict, models, optimizer, scaler, *, train_text_encoder: bool,
                           lora_only: bool = False) -> int:
    """Load `training_state`'s dict back; returns the step it was saved at."""
    from diffusion.lora import load_lora_state_dict
    parts = ["unet"] + (list(text_parts(models)) if train_text_encoder else [])
    for part in parts:
        if lora_only:
            load_lora_state_dict(getattr(models, part), state[part], source=f"checkpoint ({part} LoRA)")
        else:
            getattr(models, part).load_state_dict(state[part])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"]
