"""What a DreamBooth run's sizes ask of the machine, estimated from the flags and the model's configs before
any weight is read, and checked against the memory there is (common/memory.py):

    the images it holds      every instance image, resized so its shorter side is --resolution, and
                             --num_class_images class images, uint8 in RAM for the whole run
    the class images         batches of --sample_batch_size images sampled by the base model
    a training step          the trained weights, their gradients and Adam's moments, and the activations
                             of --train_batch_size crops (twice that with prior preservation); textual
                             inversion (train_textual_inversion.py) trains a few rows and holds the
                             frozen model in its --mixed_precision dtype, as a LoRA run does
    validation               --num_validation_images sampled between steps, beside the training state

The factors are measured upper bounds (bench/sampling_memory.py), not exact figures; a run the estimate
refuses is named with both numbers and the flag to lower (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from common.memory import available_memory, check_memory, gb, how_many_fit, training_device

# Activations the UNet keeps for backward, as maps of its block_out_channels[0] per latent pixel and image,
# measured on a CPU in fp32 (bench/sampling_memory.py --train): SD v1 about 390 (128 to 256-pixel crops),
# the embedded tiny model about 180; with --gradient_checkpointing about half. Rounded up.
UNET_TRAINING_MAPS = {False: 400, True: 200}
TRAINED_PARAMETER_BYTES = 16       # fp32 weight, its gradient, Adam's exp_avg and exp_avg_sq


def held_image_bytes(args: argparse.Namespace, instance_files: list[Path]) -> int:
    """The uint8 images kept in RAM: each instance image at its resized size (from the file's header: its
    shorter side becomes --resolution, as dreambooth.data.load_image does), the class images as squares."""
    from PIL import Image

    from common.images import resized_size
    r, total = args.resolution, 0
    for file in instance_files:
        with Image.open(file) as im:
            w, h = im.size
        total += 3 * math.prod(resized_size(w, h, r))
    if getattr(args, "with_prior_preservation", False):   # train_textual_inversion.py has no class images
        total += 3 * r * r * args.num_class_images
    return total


def check_run_memory(args: argparse.Namespace, configs, instance_files: list[Path]) -> None:
    """Refuse (UsageError naming the flag to lower) a run whose images, class-image batches, training step or
    validation would not fit in the memory of the device it trains on (and the images in RAM)."""
    from common.state_dict import empty_model
    from diffusion import lora
    from diffusion.checkpoints.configs import parameter_counts
    from diffusion.models.unet import UNet2DConditionModel
    from diffusion.pipeline import VAE_DECODER_MAPS, sampling_memory

    unet_config, vae_config = configs
    prior = getattr(args, "with_prior_preservation", False)   # train_textual_inversion.py: no prior, no --rank
    rank, inversion = getattr(args, "rank", None), hasattr(args, "placeholder_token")
    device = training_device(args.device)
    r, f = args.resolution, vae_config.spatial_factor
    counts = parameter_counts(args.pretrained_model_name_or_path, configs)
    unet_n, vae_n, text_n = counts["unet"], counts["vae"], counts["text_encoder"]
    with empty_model():                            # the adapted layers' widths, no memory
        unet = UNet2DConditionModel(config=unet_config)
    held = held_image_bytes(args, instance_files)
    ram_too = held if device.type == "cpu" else 0   # on a GPU the images stay in RAM: checked apart
    if device.type != "cpu":
        check_memory(held, device="cpu", what=f"--resolution {r}: {len(instance_files)} instance images"
                     + (f" and --num_class_images {args.num_class_images}" if prior else ""),
                     advice="lower --resolution or --num_class_images")
    what = f"--resolution {r}"
    check_memory(ram_too, device=device, what=f"{what}: {len(instance_files)} instance images"
                 + (f" and --num_class_images {args.num_class_images}" if prior else "")
                 + " held in memory", advice="lower --resolution or --num_class_images")

    if prior:              # the base model samples class images in batches
        one = sampling_memory(unet_config, vae_config, images=1, height=r, width=r)
        weights = 4 * (unet_n + vae_n + text_n)
        need = ram_too + weights + args.sample_batch_size * one
        fit = how_many_fit(ram_too + weights, one, device)
        check_memory(need, device=device, what=f"--sample_batch_size {args.sample_batch_size} class images of "
                     f"{what}", advice=f"about {gb(one)} an image" + (f"; {fit} fit at once: lower --sample_batch_size"
                                                                      f" to {fit} or less" if fit else ""))

    precision_bytes = 2 if args.mixed_precision in ("fp16", "bf16") else 4
    if inversion:                                 # the new rows trained, everything else frozen in the precision
        weights = precision_bytes * (unet_n + vae_n + text_n)
    elif rank is None:                            # full fine-tuning: fp32 master weights and Adam
        trained = unet_n + (text_n if args.train_text_encoder else 0)
        weights = TRAINED_PARAMETER_BYTES * trained + 4 * (unet_n + vae_n + text_n - trained)
    else:                                         # LoRA: the base frozen in the precision, the updates trained
        widths = [(m.in_features, m.out_features) for n, m in unet.named_modules()
                  if n in set(lora.target_names(unet, lora.UNET_TARGETS))]
        lora_n = sum(rank * (i + o) for i, o in widths) * (2 if args.train_text_encoder else 1)
        weights = precision_bytes * (unet_n + vae_n + text_n) + TRAINED_PARAMETER_BYTES * lora_n
    crops = args.train_batch_size * (2 if prior else 1)
    one = 4 * ((r // f) ** 2 * unet_config.block_out_channels[0] * UNET_TRAINING_MAPS[args.gradient_checkpointing]
               + r * r * vae_config.block_out_channels[0] * VAE_DECODER_MAPS)    # + the VAE encoding the crop
    if ram_too + weights > (available_memory(device) or float("inf")):
        advice = ("use a machine with more memory" if inversion else "use a smaller --rank" if rank is not None
                  else "the weights, gradients and optimizer state alone are that much: train a LoRA (--rank 4), "
                       "or use a machine with more memory")
    else:
        fit = how_many_fit(ram_too + weights, one, device)
        advice = (f"about {gb(one)} a crop" + (f"; {fit} fit" if fit is not None else "") +
                  ": lower --train_batch_size (--gradient_accumulation_steps keeps the batch), add "
                  "--gradient_checkpointing, or lower --resolution")
    check_memory(ram_too + weights + crops * one, device=device,
                 what=f"a training step of --train_batch_size {args.train_batch_size} crops of {what}"
                 + (" (and as many class crops)" if prior else ""), advice=advice)

    if args.validation_prompt:
        one = sampling_memory(unet_config, vae_config, images=1, height=r, width=r)
        fit = how_many_fit(ram_too + weights, one, device)
        check_memory(ram_too + weights + args.num_validation_images * one, device=device,
                     what=f"--num_validation_images {args.num_validation_images} of {what} beside the training state",
                     advice=f"about {gb(one)} an image" + (f"; {fit} fit: lower --num_validation_images to {fit} or "
                                                            "less" if fit else ""))


def sdxl_full_fine_tuning_refusal(unet_config) -> str:
    """Why train_dreambooth.py trains SDXL as a LoRA only (as diffusers' DreamBooth examples do: SDXL ships as
    train_dreambooth_lora_sdxl.py), with the memory full fine-tuning of this UNet would take, computed from
    its parameter count: an fp32 weight, its gradient and AdamW's two moments, 16 bytes a parameter, before
    any activation (SDXL base's 2.57 billion: 41 GB)."""
    from common.state_dict import empty_model
    from diffusion.models.unet import UNet2DConditionModel
    with empty_model():
        n = sum(p.numel() for p in UNet2DConditionModel(config=unet_config).parameters())
    return (f"an SDXL model: train_dreambooth.py trains SDXL as a LoRA (add --rank 4, as diffusers' "
            f"train_dreambooth_lora_sdxl.py); full fine-tuning of its UNet ({n / 1e9:.3g} billion parameters) "
            f"would hold {TRAINED_PARAMETER_BYTES * n / 1e9:.3g} GB of fp32 weights, gradients and AdamW moments "
            f"before any activation, and is not built")
