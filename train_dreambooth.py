"""DreamBooth (Ruiz et al. 2022) for Stable Diffusion v1, with class-prior preservation. The whole loop is
in `main`, top to bottom; the flags are those of diffusers' examples/dreambooth/train_dreambooth.py.

    python train_dreambooth.py --pretrained_model_name_or_path stable-diffusion-v1-5/ \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir dog-class/ --class_prompt "a photo of dog" \\
        --resolution 512 --train_batch_size 1 --learning_rate 1e-6 --max_train_steps 800 \\
        --mixed_precision bf16 --gradient_checkpointing --output_dir sks-dog --save_single_file
    torchrun --nproc_per_node 2 train_dreambooth.py ...   # data parallel: gloo on CPU, NCCL on CUDA
    python train_dreambooth.py --config configs/train_dreambooth.example.toml --max_train_steps 400
    python train_dreambooth.py        # no arguments: the demo on the embedded tiny model, on a CPU

A few photos of one subject are bound to a rare identifier ("sks") by fine-tuning the UNet (and, with
--train_text_encoder, the CLIP text encoder). With --with_prior_preservation the base model first
generates --num_class_images images of the class prompt, and every batch also denoises those, so the
class ("dog") keeps its variety instead of collapsing onto the subject (the paper's eq. 2).

--output_dir ends up a diffusers folder (StableDiffusionPipeline.from_pretrained and sample.py --ckpt
load it; untrained parts are copied as they came), plus with --save_single_file `<name>.safetensors`
in the original single-file layout (fp16, weights only), `checkpoint-<step>.pt` training states,
`metrics.jsonl`, `validation/` grids, `run_config.toml` and `run_info.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

from common.run_config import check_resume_config, finish_run_record, parse_args_with_config, start_run_record
from common.state_dict import CheckpointError
from common.training import (MIXED_PRECISION, PRECISION_NAME, MetricsLog, StopOnSignal, all_reduce_sum, autocast,
                             barrier, grad_scaler, load_checkpoint, resolve_checkpoint, rng_state, save_checkpoint,
                             seed_everything, set_rng_state, setup_distributed, stop_requested,
                             teardown_distributed)
from diffusion.dreambooth_data import (DataError, check_model_size, check_writable, crop, example_generator,
                                       generate_class_images, image_files, load_image, missing_class_indices)
from diffusion.layout import arrange_for_speed

# The settings that shape a run: resuming with any of them changed needs --allow_config_change.
RUN_SHAPING = ("pretrained_model_name_or_path", "pretrained_config_dir", "instance_data_dir", "instance_prompt",
               "class_data_dir", "class_prompt", "with_prior_preservation", "prior_loss_weight", "num_class_images",
               "train_text_encoder", "resolution", "center_crop", "train_batch_size", "gradient_accumulation_steps",
               "world_size", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
               "num_train_epochs", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
               "mixed_precision", "seed", "offset_noise", "snr_gamma")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OFFSET_NOISE_SCALE = 0.1        # diffusers' --offset_noise strength (Guttenberg 2023, "Diffusion with Offset Noise")
CLASS_SAMPLING = dict(steps=50, guidance_scale=7.5)        # StableDiffusionPipeline's defaults, as diffusers uses
VALIDATION_SAMPLING = dict(steps=25, guidance_scale=7.5)   # diffusers' DreamBooth validation settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_dreambooth.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="a TOML file of flag = value lines; flags on the command line override it")
    a("--pretrained_model_name_or_path", help="SD v1 diffusers folder or single .safetensors/.ckpt file (required)")
    a("--pretrained_config_dir", help="for a single file: folder with unet/, vae/, text_encoder/ config.json (and "
                                      "tokenizer/), as sample.py --config (default: inferred from the shapes)")
    a("--instance_data_dir", help="folder with the photos of the subject (required)")
    a("--instance_prompt", help="prompt with the identifier, e.g. 'a photo of sks dog' (required)")
    a("--class_data_dir", help="class images; the missing ones are generated here by the base model")
    a("--class_prompt", help="prompt of the class, e.g. 'a photo of dog'")
    a("--with_prior_preservation", action="store_true", help="add the class-prior preservation loss")
    a("--prior_loss_weight", type=float, default=1.0, help="weight of the prior preservation loss")
    a("--num_class_images", type=int, default=100, help="class images wanted in --class_data_dir")
    a("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    a("--plms", action="store_true", help="class and validation images with PLMS instead of DDIM (as sample.py)")
    a("--train_text_encoder", action="store_true", help="fine-tune the text encoder too")
    a("--resolution", type=int, default=512, help="training images are resized and cropped to this square")
    a("--center_crop", action="store_true", help="crop at the centre (default: at a random offset)")
    a("--train_batch_size", type=int, default=4, help="instance images per process per micro-batch")
    a("--num_train_epochs", type=int, default=1, help="epochs, unless --max_train_steps is set")
    a("--max_train_steps", type=int, help="optimizer steps in all (overrides --num_train_epochs)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--learning_rate", type=float, default=5e-6, help="peak learning rate of AdamW")
    a("--scale_lr", action="store_true", help="multiply the learning rate by the global batch size")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning rate schedule")
    a("--lr_warmup_steps", type=int, default=500, help="linear warmup steps (not used by 'constant')")
    a("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--mixed_precision", default="no", choices=list(MIXED_PRECISION), help="autocast dtype of the forward pass")
    a("--checkpointing_steps", type=int, default=500, help="save the full training state every N steps")
    a("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", help="a checkpoint file, or 'latest' in --output_dir")
    a("--allow_config_change", action="store_true", help="resume even when run-shaping settings changed")
    a("--output_dir", default="dreambooth-model", help="model, checkpoints, metrics and run record go here")
    a("--seed", type=int, default=0, help="data order, crops, noise, timesteps, class and validation images")
    a("--validation_prompt", help="prompt sampled every --validation_steps")
    a("--num_validation_images", type=int, default=4, help="images per validation grid")
    a("--validation_steps", type=int, default=100, help="validate every N steps")
    a("--offset_noise", action="store_true", help=f"add {OFFSET_NOISE_SCALE} x per-channel offset noise")
    a("--snr_gamma", type=float, help="min-SNR loss weighting with this gamma (5.0 is recommended)")
    a("--save_single_file", action="store_true", help="also write the original single-file layout (fp16)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that need neither files nor a model."""
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")
    if args.with_prior_preservation and not args.class_prompt:
        parser.error("--with_prior_preservation needs --class_prompt (the prompt of the class images)")
    if args.with_prior_preservation and not args.class_data_dir:
        parser.error("--with_prior_preservation needs --class_data_dir (where the class images are kept)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs",
                 "resolution", "sample_batch_size", "num_validation_images", "validation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.with_prior_preservation and args.num_class_images < 1:
        parser.error(f"--num_class_images {args.num_class_images}: must be at least 1")
    if args.learning_rate <= 0 or args.lr_warmup_steps < 0 or args.max_grad_norm < 0 or args.prior_loss_weight < 0:
        parser.error("--learning_rate must be > 0; --lr_warmup_steps, --max_grad_norm, --prior_loss_weight >= 0")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        parser.error(f"--snr_gamma {args.snr_gamma}: must be > 0")


def learning_rate(step: int, total: int, peak: float, args) -> float:
    """diffusers' get_scheduler: constant; constant after a linear warmup from 0; or warmup then a
    linear decay to 0, or half a cosine to 0 (Loshchilov & Hutter 2017, eq. 5), at `total`."""
    warm = args.lr_warmup_steps
    if args.lr_scheduler == "constant":
        return peak
    if step < warm:
        return peak * step / warm
    progress = (step - warm) / max(1, total - warm)
    if args.lr_scheduler == "linear":
        return peak * max(0.0, 1.0 - progress)
    if args.lr_scheduler == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak


def checkpoint_text_encoder_layers(text_encoder: torch.nn.Module) -> None:
    """Gradient checkpointing for the CLIP text encoder: each layer recomputed in the backward pass
    (the instance's forward is wrapped; weights and key names are untouched)."""
    for layer in text_encoder.layers:
        plain = layer.forward
        layer.forward = lambda x, plain=plain: (recompute(plain, x, use_reentrant=False)
                                                if torch.is_grad_enabled() else plain(x))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB: the peak RSS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args, parser)
    output_dir, class_dir = Path(args.output_dir), Path(args.class_data_dir or ".")

    # ---- every input problem is reported here, before any model is loaded ----------------------------
    try:
        instance_files = image_files(args.instance_data_dir, flag="--instance_data_dir")
        if not instance_files:
            raise DataError(f"--instance_data_dir {args.instance_data_dir}: no images in this folder")
        check_model_size(args)
        check_writable(output_dir, "--output_dir")
        missing = missing_class_indices(class_dir, args.num_class_images) if args.with_prior_preservation else []
        if missing:
            check_writable(class_dir, "--class_data_dir")
        instance_images = [load_image(f, args.resolution) for f in instance_files]   # (3, H, W) uint8 each
        dist = setup_distributed(args.device)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    seed_everything(args.seed)
    from diffusion.schedule import NoiseSchedule, ScheduleConfig
    from diffusion.weights import load_stable_diffusion
    try:
        models = load_stable_diffusion(args.pretrained_model_name_or_path, config_dir=args.pretrained_config_dir)
        from diffusion.pipeline import check_size  # a .ckpt's architecture is known only now
        check_size(args.resolution, args.resolution, models.unet.config, models.vae.config,
                   names=("--resolution", "--resolution"))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: --pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {e}", file=sys.stderr)
        teardown_distributed(dist)
        return 2
    unet, vae, text_encoder, tokenizer = models.unet, models.vae, models.text_encoder, models.tokenizer
    for m in (unet, vae, text_encoder):
        m.to(dist.device)
    # channels-last where diffusion/layout.py measured it faster: on a CPU, the UNet under bf16 (the
    # training step too: 1.35x, bench/train_sd.py) and the frozen VAE
    layouts = arrange_for_speed(models, device=dist.device, precision=PRECISION_NAME[args.mixed_precision])
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(models.scheduler_config))

    # ---- class images: generated by the base model, one fixed seed per index, shared among processes --
    if missing:
        generate_class_images(models, class_dir, missing, prompt=args.class_prompt, resolution=args.resolution,
                              seed=args.seed, batch_size=args.sample_batch_size,
                              precision=PRECISION_NAME[args.mixed_precision],
                              share=(dist.rank, dist.world_size), progress=dist.is_main,
                              sampler="plms" if args.plms else "ddim", **CLASS_SAMPLING)
    barrier(dist)
    class_images = ([load_image(f, args.resolution) for f in
                     image_files(class_dir, flag="--class_data_dir")[:args.num_class_images]]
                    if args.with_prior_preservation else [])

    # ---- what is trained: the UNet (and the text encoder), fp32 weights; the VAE is frozen -------------
    vae.requires_grad_(False)                      # never in the optimizer; eval mode throughout
    text_encoder.requires_grad_(args.train_text_encoder)
    unet.train()
    text_encoder.train(args.train_text_encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            checkpoint_text_encoder_layers(text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if args.train_text_encoder else [])

    global_batch = args.train_batch_size * args.gradient_accumulation_steps * dist.world_size
    # As diffusers: an epoch pairs instance i % n_inst with class image i % n_class, for max(n_inst, n_class) i.
    epoch_length = max(len(instance_images), len(class_images))
    steps_per_epoch = epoch_length // global_batch
    if steps_per_epoch == 0:
        print(f"error: {epoch_length} training examples are fewer than one global batch of {global_batch} "
              "(--train_batch_size x --gradient_accumulation_steps x processes)", file=sys.stderr)
        teardown_distributed(dist)
        return 2
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    peak_lr = args.learning_rate * (global_batch if args.scale_lr else 1)   # --scale_lr: x the global batch
    optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scaler = grad_scaler(dist.device, args.mixed_precision)

    # ---- resume: weights, optimizer, scaler, step and RNG state (the data stream follows from the step) ---
    run_settings = {**vars(args), "world_size": dist.world_size}
    step = 0
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint and resume_path is None:
        print(f"no checkpoint in {output_dir}; starting from scratch", file=sys.stderr)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        try:
            for line in check_resume_config(ckpt["run_settings"], run_settings, RUN_SHAPING,
                                            checkpoint=resume_path, allow_change=args.allow_config_change):
                print(f"warning: changed since the checkpoint:{line}", file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            teardown_distributed(dist)
            return 2
        unet.load_state_dict(ckpt["unet"])
        if args.train_text_encoder:
            text_encoder.load_state_dict(ckpt["text_encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        print(f"resumed from {resume_path} at step {step}", file=sys.stderr)

    # DDP averages the gradients over processes in backward.
    ddp_unet = DDP(unet) if dist.enabled else unet
    ddp_text = DDP(text_encoder) if dist.enabled and args.train_text_encoder else text_encoder
    log = MetricsLog(output_dir, enabled=dist.is_main)
    info = (start_run_record(output_dir, args, parser, device=str(dist.device), world_size=dist.world_size,
                             dtype=PRECISION_NAME[args.mixed_precision], argv=argv, memory_format=layouts)
            if dist.is_main else None)

    def text_states(prompt: str, n: int) -> torch.Tensor:
        """(n, 77, D) CLIP states of `prompt`; with gradients only when the text encoder is trained."""
        ids = tokenizer([prompt] * n, padding=True, max_length=tokenizer.model_max_length).to(dist.device)
        with torch.set_grad_enabled(args.train_text_encoder), autocast(dist.device, args.mixed_precision):
            return ddp_text(ids).last_hidden_state

    def checkpoint() -> None:
        state = {"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "rng": rng_state(), "run_settings": run_settings}
        if args.train_text_encoder:
            state["text_encoder"] = text_encoder.state_dict()
        if dist.is_main:
            save_checkpoint(output_dir, step, state, total_limit=args.checkpoints_total_limit)
        barrier(dist)

    def validate() -> None:
        """--num_validation_images of --validation_prompt, one fixed seed, saved as one grid."""
        if dist.is_main and args.validation_prompt:
            from diffusion.pipeline import generate
            from sample import make_grid
            unet.eval()
            text_encoder.eval()
            images = generate(models, [args.validation_prompt], num_images_per_prompt=args.num_validation_images,
                              height=args.resolution, width=args.resolution, seed=args.seed, progress=False,
                              precision=PRECISION_NAME[args.mixed_precision],
                              output="pil", sampler="plms" if args.plms else "ddim", **VALIDATION_SAMPLING)
            unet.train()
            text_encoder.train(args.train_text_encoder)
            (output_dir / "validation").mkdir(exist_ok=True)
            make_grid(images).save(output_dir / "validation" / f"step-{step:06d}.png")
        barrier(dist)

    # ---- the loop ---------------------------------------------------------------------------------------
    B, C, L = args.train_batch_size, unet.config.in_channels, vae.config.latent_channels
    f, T = vae.config.spatial_factor, schedule.num_train_timesteps
    prior = args.with_prior_preservation
    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    stopped_by = None
    with StopOnSignal() as stop:
        while step < max_steps and stopped_by is None:
            t0 = time.perf_counter()
            epoch, s = divmod(step, steps_per_epoch)
            order = torch.randperm(epoch_length, generator=torch.Generator().manual_seed(args.seed + epoch))
            sums = torch.zeros(2, device=dist.device)                     # instance loss, prior loss
            for micro in range(args.gradient_accumulation_steps):
                # Example positions in the epoch's order: this process's share of the global batch.
                first = s * global_batch + (micro * dist.world_size + dist.rank) * B
                positions = range(first, first + B)
                gens = [example_generator(args.seed, epoch, k) for k in positions]
                ids = [int(order[k]) for k in positions]
                pixels = [crop(instance_images[i % len(instance_images)], args.resolution, center=args.center_crop,
                               generator=g) for i, g in zip(ids, gens)]
                if prior:   # class examples after the instance examples, one batch
                    pixels += [crop(class_images[i % len(class_images)], args.resolution, center=args.center_crop,
                                    generator=g) for i, g in zip(ids, gens)]
                pixels = torch.stack(pixels).to(dist.device)              # (N, 3, r, r), N = B or 2B
                per_example = gens * (2 if prior else 1)                  # example i's generator for both images

                # Latents: a sample of the frozen VAE's posterior q(z|x), z = mean + std * e (row by row
                # what posterior.sample(generator) draws), times the scaling factor (0.18215 for SD v1).
                with torch.no_grad(), autocast(dist.device, args.mixed_precision):
                    posterior = vae.encode(pixels)                        # (N, L, r/f, r/f) moments
                z_noise = torch.cat([torch.randn((1, L, args.resolution // f, args.resolution // f), generator=g)
                                     for g in per_example]).to(dist.device)
                latents = (posterior.mean.float() + posterior.std.float() * z_noise) * vae.config.scaling_factor

                # Forward process (DDPM eq. 4) at a random timestep per image.
                noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in per_example])
                if args.offset_noise:     # a per-image, per-channel constant: lets the model shift brightness
                    noise = noise + OFFSET_NOISE_SCALE * torch.cat([torch.randn((1, C, 1, 1), generator=g)
                                                                    for g in per_example])
                t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in per_example]).to(dist.device)  # (N,)
                noise = noise.to(dist.device)
                noisy = schedule.add_noise(latents, noise, t)

                last_micro = micro == args.gradient_accumulation_steps - 1
                with contextlib.ExitStack() as no_sync:
                    if dist.enabled and not last_micro:   # gradients are all-reduced on the last micro-batch only
                        no_sync.enter_context(ddp_unet.no_sync())
                        if args.train_text_encoder:
                            no_sync.enter_context(ddp_text.no_sync())
                    states = torch.cat([text_states(args.instance_prompt, B)]
                                       + ([text_states(args.class_prompt, B)] if prior else []))  # (N, 77, D)
                    with autocast(dist.device, args.mixed_precision):
                        pred = ddp_unet(noisy, t, states)                 # (N, C, h, w), one UNet call
                    if schedule.config.prediction_type == "v_prediction":
                        target = schedule.get_velocity(latents, noise, t)
                    else:
                        target = noise
                    per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (N,)
                    if args.snr_gamma is not None:
                        # Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
                        # Weighting Strategy"): weight min(SNR, gamma) on the x_0 loss, which is
                        # min(SNR, gamma) / SNR on the epsilon loss and min(SNR, gamma) / (SNR + 1) on the v loss,
                        # with SNR(t) = alpha_bar_t / (1 - alpha_bar_t).
                        a = schedule.alphas_cumprod.to(dist.device)[t]
                        snr = a / (1 - a)
                        v = schedule.config.prediction_type == "v_prediction"
                        per_image = per_image * torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if v else snr)
                    instance_loss, prior_loss = (per_image.chunk(2) if prior else (per_image, per_image[:0]))
                    # DreamBooth eq. 2: the instance loss plus lambda times the loss on the class images.
                    loss = instance_loss.mean() + (args.prior_loss_weight * prior_loss.mean() if prior else 0.0)
                    scaler.scale(loss / args.gradient_accumulation_steps).backward()
                sums += torch.stack([instance_loss.mean().detach(),
                                     prior_loss.mean().detach() if prior else torch.zeros((), device=dist.device)])

            lr = learning_rate(step, max_steps, peak_lr, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)                      # so clipping sees the true gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            scaler.step(optimizer)                          # skipped if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            means = all_reduce_sum(sums, dist).cpu() / (dist.world_size * args.gradient_accumulation_steps)
            record = {"step": step, "epoch": epoch, "loss": (means[0] + args.prior_loss_weight * means[1]).item(),
                      "instance_loss": means[0].item(), "lr": lr,
                      "grad_norm": grad_norm.item(), "step_time_s": time.perf_counter() - t0,
                      "peak_memory_mb": peak_memory_mb(dist.device)}
            if prior:
                record["prior_loss"] = means[1].item()
            log.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{means[0].item():.4f}", lr=f"{lr:.2e}")

            if stop_requested(stop, dist):
                stopped_by = stop.signum or 15
            if step % args.checkpointing_steps == 0 or (stopped_by and step < max_steps):
                checkpoint()
            if step % args.validation_steps == 0:
                validate()
    bar.close()

    if stopped_by and step < max_steps:
        print(f"stopped by signal {stopped_by} at step {step}; resume with --resume_from_checkpoint latest",
              file=sys.stderr)
        if dist.is_main:
            finish_run_record(output_dir, info, status=f"stopped by signal {stopped_by}", step=step)
        log.close()
        teardown_distributed(dist)
        return 128 + stopped_by

    # ---- export: a diffusers folder (untrained parts as they came) and the single file ---------------
    if dist.is_main:
        from diffusion.save import save_diffusers_folder, save_single_file
        trained = {"unet"} | ({"text_encoder"} if args.train_text_encoder else set())
        save_diffusers_folder(models, output_dir, trained=trained, config_dir=args.pretrained_config_dir)
        written = [output_dir]
        if args.save_single_file:
            written.append(save_single_file(models, output_dir / f"{output_dir.resolve().name}.safetensors"))
        finish_run_record(output_dir, info, step=step)
        print("model written to " + ", ".join(map(str, written)) + f" (use: python sample.py --ckpt {output_dir})")
    log.close()
    teardown_distributed(dist)
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if len(sys.argv) == 1:   # no arguments: the demo on the embedded tiny model (world/dreambooth_demo.py)
            from world.dreambooth_demo import run as demo
            sys.exit(demo())
        sys.exit(main())
