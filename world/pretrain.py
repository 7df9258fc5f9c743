"""Pretrain the tiny world's text-to-image model: an SD v1-family VAE, CLIP text encoder and UNet,
built from this project's own modules and trained from scratch on world/'s captioned scenes.

    python -m world.pretrain --out runs/world                     # both stages, resumable
    python -m world.pretrain --out runs/world --export embedded/tiny_world_sd   # ship (fp16)
    python -m world.pretrain --out runs/dec --base embedded/world_sd --vae_decoder_steps 300 --vae_batch_size 16  # stage 3 only

Stage 1, "vae": the autoencoder alone (reconstruction + a tiny KL term, as LDM's first stage).
Its latent scaling factor is then measured as 1 / std of the latents, as Rombach et al. did for SD
(section 4.3.2 / appendix G: "rescale the latents to unit standard deviation").
Stage 2, "t2i": the VAE frozen; the text encoder and the UNet trained jointly on the epsilon
objective (DDPM eq. 14) with Min-SNR-5 weighting, and the caption dropped (replaced by "") 10% of
the time so that one network learns both halves of classifier-free guidance (Ho & Salimans 2022).
An exponential moving average of both is what gets exported.
Stage 3, "vae_decoder" (--vae_decoder_steps N, off by default): the VAE's decoder alone fine-tuned on a
mix of the world's scenes and two-colour objects (world/world.py's TwoColourWorld), which stage 1 never
showed. The encoder and quant_conv stay frozen, so the latents, their scaling factor and every model
trained on them stay valid, as SD's ft-EMA/ft-MSE decoders were made (the "sd-vae-ft-*" model cards).
It runs after stage 1, or with --base on a finished model folder (the shipped one included); only the
VAE of that folder changes.

Everything is a pure function of --seed and the step: batch s is World(seed).batch(s, B), and
every random draw of step s comes from a generator seeded with (seed, stage, s). So a run that is
stopped (Ctrl-C, or a session that ends) resumes from its last checkpoint-<step>.pt and ends bit
for bit where an uninterrupted run would. CPU time (process time, all threads) is summed across
resumes and printed.

The output, `<out>/model/`, is an SD v1 diffusers folder, written at every t2i checkpoint and read by
the same loader as a real checkpoint (`sample.py --ckpt runs/world/model`).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip.text_model import CLIPTextConfig, CLIPTextModel
from common.training import (CHECKPOINT_NAME, Checkpoints, MetricsLog, StopOnSignal, adamw, learning_rate,
                             list_checkpoints, load_checkpoint)
from diffusion.checkpoints.save import save_models_folder
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from diffusion.models.unet import CROSS_DOWN, CROSS_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig
from diffusion.models.vae import DOWN, UP, AutoencoderKL, VAEConfig
from diffusion.checkpoints.load import StableDiffusionModels
from world.vocabulary import MAX_LENGTH, build_tokenizer
from world.world import TwoColourWorld, World

# ---- the architectures ------------------------------------------------------------------------------
# 64x64 images -> 16x16x4 latents (three levels: spatial factor 4).
VAE = VAEConfig(block_out_channels=(32, 64, 64), down_block_types=(DOWN,) * 3, up_block_types=(UP,) * 3,
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                scaling_factor=1.0)   # replaced by the measured 1 / std after stage 1
# 16x16 -> 8x8 -> 4x4; cross-attention at 8x8 and in the 4x4 middle, where a token can still say
# "left" or "top"; 4 heads of 16 channels.
UNET = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=(PLAIN_DOWN, CROSS_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_UP, PLAIN_UP),
                  attention_head_dim=4, cross_attention_dim=128, norm_num_groups=8, sample_size=16)
TEXT = dict(max_position_embeddings=MAX_LENGTH, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=4, hidden_act="quick_gelu")
SCHEDULE = ScheduleConfig.sd_v1()     # the same noise schedule and sampler settings as SD v1

CAPTION_DROPOUT = 0.1   # fraction of captions replaced by "" (the unconditional prompt)
KL_WEIGHT = 1e-6        # LDM's KL weight for its f=8 KL autoencoders
FOREGROUND_WEIGHT = 10.0  # the VAE's L1 weight on object pixels (see train_vae)
LOGVAR_INIT = -6.0      # initial log variance of the VAE posterior (see train_vae)
MIN_SNR_GAMMA = 5.0     # Hang et al. 2023
EMA_DECAY = 0.999
WARMUP = 500
DECODER_WARMUP = 50     # stage 3's warmup steps (it starts from a trained decoder)


def to_pixels(images) -> torch.Tensor:
    """(B, H, W, 3) uint8 numpy -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def foreground(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, 1, H, W) 1.0 where a pixel differs from the image's background (the
    median of its 2-pixel border) by more than 0.1 in some channel, else 0.0."""
    border = torch.cat([x[..., :2, :].flatten(2), x[..., -2:, :].flatten(2),
                        x[..., :, :2].flatten(2), x[..., :, -2:].flatten(2)], dim=2)       # (B, 3, n)
    background = border.median(dim=2).values[..., None, None]                             # (B, 3, 1, 1)
    return ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l1, edges): L1 on pixels, the object's pixels weighted FOREGROUND_WEIGHT times (it covers 2-15% of
    the image: unweighted, the background alone drives the loss for the first thousand steps), and L1 on
    the horizontal/vertical pixel differences (edges stay sharp)."""
    weight = 1 + (FOREGROUND_WEIGHT - 1) * foreground(x)                    # (B, 1, 64, 64)
    l1 = (weight * (recon - x).abs()).mean() / weight.mean()
    edges = (F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2)))
    return l1, edges


def generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_000_019 + step)


def resume(checkpoints: Checkpoints, state: dict) -> int:
    """Load the newest readable checkpoint into the objects of `state`; return its step (0 if none)."""
    found = checkpoints.resume("latest")
    if found is None:
        return 0
    path, saved = found
    step = int(CHECKPOINT_NAME.fullmatch(path.name)[1])
    for name, obj in state.items():
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(saved[name])
        else:
            state[name] = saved[name]
    print(f"resumed from {path}")
    return step


def checkpoint(checkpoints: Checkpoints, step: int, state: dict) -> None:
    """The objects of `state` (modules, optimizer: their state dicts; numbers as they are) to
    checkpoint-<step>.pt, atomically; the Checkpoints keep the newest two."""
    checkpoints.save(step, {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()})


# ---- stage 1: the VAE ------------------------------------------------------------------------------
def train_vae(args, world: World) -> AutoencoderKL:
    folder = args.out / "vae"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(config=copy.deepcopy(VAE))
    with torch.no_grad():
        # Start the posterior narrow: log variance bias LOGVAR_INIT (std 0.05) instead of ~0 (std ~1). At
        # std ~1 the decoder sees the latents through noise as strong as the signal and learns only the
        # background for hundreds of steps (measured: 0% colour read back at step 500); the tiny KL
        # weight barely pulls the variance up again.
        vae.quant_conv.bias[VAE.latent_channels:] = LOGVAR_INIT
    optimizer = adamw(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state = {"vae": vae, "optimizer": optimizer, "cpu_seconds": 0.0, "scaling_factor": None}
    checkpoints = Checkpoints(folder, total_limit=2)
    step = resume(checkpoints, state)
    log = MetricsLog(folder, start_step=step)
    with StopOnSignal() as stop:
        while step < args.vae_steps and stop.signum is None:
            t0 = time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total=args.vae_steps, peak=args.vae_lr, schedule="cosine",
                                            warmup=WARMUP)
            x = to_pixels(world.batch(step, args.vae_batch_size).images)            # (B, 3, 64, 64)
            with torch.autocast("cpu", dtype=torch.bfloat16):                        # 1.7x faster here
                posterior = vae.encode(x)
                recon = vae.decode(posterior.sample(generator(args.seed, 1, step))).float()  # (B, 3, 64, 64)
            # the reconstruction loss, plus the KL divergence to N(0, I) summed over the latent elements
            # (Kingma & Welling 2014, appendix B)
            l1, edges = reconstruction_loss(recon, x)
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
            loss = l1 + edges + KL_WEIGHT * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            step += 1
            state["cpu_seconds"] += time.process_time() - t0
            if step % 50 == 0 or step == args.vae_steps:
                log.log({"step": step, "l1": l1.item(), "edges": edges.item(), "kl": kl.item(),
                         "cpu_s": round(state["cpu_seconds"])})
                print(f"vae {step}/{args.vae_steps} l1 {l1.item():.4f} edges {edges.item():.4f} kl {kl.item():.0f} "
                      f"cpu {state['cpu_seconds'] / 60:.1f} min", flush=True)
            if step % args.checkpoint_every == 0 or step == args.vae_steps or stop.signum is not None:
                if step == args.vae_steps:
                    state["scaling_factor"] = measure_scaling_factor(vae, World(args.seed + 1))
                checkpoint(checkpoints, step, state)
    log.close()
    if step < args.vae_steps:
        sys.exit(f"stopped at VAE step {step}; run the same command again to resume")
    vae.config.scaling_factor = state["scaling_factor"]
    print(f"VAE done: {state['cpu_seconds'] / 60:.1f} CPU minutes, scaling factor {vae.config.scaling_factor:.5f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, world: World, n: int = 2048) -> float:
    """1 / std of posterior samples over n fresh scenes (rounded to 5 digits, like SD's 0.18215)."""
    z = torch.cat([vae.encode(to_pixels(world.batch(i, 256).images)).sample(torch.Generator().manual_seed(i))
                   for i in range(n // 256)])
    return round(1.0 / z.std().item(), 5)


# ---- stage 2: text encoder + UNet ------------------------------------------------------------------
def train_t2i(args, world: World, vae: AutoencoderKL) -> None:
    folder = args.out / "t2i"
    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed + 2)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer.vocab), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEXT)
    text_encoder, unet = CLIPTextModel(text_config), UNet2DConditionModel(config=copy.deepcopy(UNET))
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = adamw(params, lr=args.lr, weight_decay=0.01)
    state = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_text, "ema_unet": ema_unet,
             "optimizer": optimizer, "cpu_seconds": 0.0}
    checkpoints = Checkpoints(folder, total_limit=2)
    step = resume(checkpoints, state)
    schedule = NoiseSchedule(config=SCHEDULE)
    alphas_cumprod = schedule.alphas_cumprod
    models = StableDiffusionModels(unet=ema_unet, vae=vae, text_encoder=ema_text, tokenizer=tokenizer,
                                   scheduler_config={"_class_name": "PNDMScheduler", **asdict(SCHEDULE)},
                                   source="world/pretrain.py", layout="memory")
    log = MetricsLog(folder, start_step=step)
    with StopOnSignal() as stop:
        while step < args.steps and stop.signum is None:
            t0 = time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total=args.steps, peak=args.lr, schedule="cosine", warmup=WARMUP)
            g = generator(args.seed, 2, step)
            batch = world.batch(step, args.batch_size)
            B = len(batch.captions)
            captions = ["" if drop else text for text, drop in
                        zip(batch.captions, (torch.rand(B, generator=g) < CAPTION_DROPOUT).tolist())]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                posterior = vae.encode(to_pixels(batch.images))
            latents = (posterior.mean.float() + posterior.std.float() * torch.randn(posterior.mean.shape, generator=g)) \
                * vae.config.scaling_factor                                                   # (B, 4, 16, 16)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=g)             # (B,)
            noisy = schedule.add_noise(latents, noise, t)                                     # DDPM eq. 4
            states = text_encoder(tokenizer(captions, max_length=MAX_LENGTH)).last_hidden_state  # (B, 20, 128)
            pred = unet(noisy, t, states)                                                     # (B, 4, 16, 16)
            per_image = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))         # (B,)
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            loss = (per_image * torch.clamp(snr, max=MIN_SNR_GAMMA) / snr).mean()             # Min-SNR-5 on eps
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():   # EMA: theta_ema <- d theta_ema + (1 - d) theta
                for ema, live in ((ema_text, text_encoder), (ema_unet, unet)):
                    for e, p in zip(ema.parameters(), live.parameters()):
                        e.lerp_(p, 1 - EMA_DECAY)
            step += 1
            state["cpu_seconds"] += time.process_time() - t0
            if step % 50 == 0 or step == args.steps:
                log.log({"step": step, "loss": loss.item(), "mse": per_image.mean().item(),
                         "lr": optimizer.param_groups[0]["lr"], "cpu_s": round(state["cpu_seconds"])})
                print(f"t2i {step}/{args.steps} loss {loss.item():.4f} mse {per_image.mean().item():.4f} "
                      f"cpu {state['cpu_seconds'] / 60:.1f} min", flush=True)
            if step % args.checkpoint_every == 0 or step == args.steps or stop.signum is not None:
                checkpoint(checkpoints, step, state)
                save_models_folder(models, args.out / "model")
    log.close()
    if step < args.steps:
        sys.exit(f"stopped at step {step}; run the same command again to resume")
    print(f"text-to-image done: {state['cpu_seconds'] / 60:.1f} CPU minutes; model in {args.out / 'model'}")


# ---- stage 3: the VAE decoder on two-colour objects -----------------------------------------------------
def train_vae_decoder(args, vae: AutoencoderKL) -> AutoencoderKL:
    """Fine-tune `vae`'s decoder (post_quant_conv + decoder) for --vae_decoder_steps steps, each on half a
    batch of the world's scenes and half of two-colour objects, with stage 1's reconstruction loss (no
    KL term: the encoder, hence the posterior, is frozen). fp32 throughout (stage 1 ran under bf16
    autocast on a CPU with AMX; on one without, bf16 is emulated and ~100x slower)."""
    folder = args.out / "vae_decoder"
    vae = copy.deepcopy(vae).train()
    vae.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = adamw(params, lr=args.vae_decoder_lr, weight_decay=0.0)
    state = {"vae": vae, "optimizer": optimizer, "cpu_seconds": 0.0}
    checkpoints = Checkpoints(folder, total_limit=2)
    step = resume(checkpoints, state)
    log = MetricsLog(folder, start_step=step)
    plain, two_colour = World(args.seed, split="all"), TwoColourWorld(args.seed, split="all")
    half = args.vae_batch_size // 2
    with StopOnSignal() as stop:
        while step < args.vae_decoder_steps and stop.signum is None:
            t0 = time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total=args.vae_decoder_steps, peak=args.vae_decoder_lr,
                                            schedule="cosine", warmup=DECODER_WARMUP)
            x = to_pixels(np.concatenate([plain.batch(step, half).images,
                                          two_colour.batch(step, args.vae_batch_size - half).images]))  # (B, 3, 64, 64)
            with torch.no_grad():
                z = vae.encode(x).sample(generator(args.seed, 3, step))              # (B, 4, 16, 16)
            recon = vae.decode(z)                                                    # (B, 3, 64, 64)
            l1, edges = reconstruction_loss(recon, x)                               # stage 1's loss, less the KL
            loss = l1 + edges
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            state["cpu_seconds"] += time.process_time() - t0
            if step % 50 == 0 or step == args.vae_decoder_steps:
                log.log({"step": step, "l1": l1.item(), "edges": edges.item(), "cpu_s": round(state["cpu_seconds"])})
                print(f"vae_decoder {step}/{args.vae_decoder_steps} l1 {l1.item():.4f} edges {edges.item():.4f} "
                      f"cpu {state['cpu_seconds'] / 60:.1f} min", flush=True)
            if step % args.checkpoint_every == 0 or step == args.vae_decoder_steps or stop.signum is not None:
                checkpoint(checkpoints, step, state)
    log.close()
    if step < args.vae_decoder_steps:
        sys.exit(f"stopped at VAE decoder step {step}; run the same command again to resume")
    print(f"VAE decoder done: {state['cpu_seconds'] / 60:.1f} CPU minutes")
    return vae.eval().requires_grad_(False)


def load_trained_vae(args) -> AutoencoderKL:
    found = list_checkpoints(args.out / "vae")
    if not found or found[-1][0] < args.vae_steps:
        return train_vae(args, World(args.seed))
    saved = load_checkpoint(found[-1][1])
    vae = AutoencoderKL(config=copy.deepcopy(VAE))
    vae.load_state_dict(saved["vae"])
    vae.config.scaling_factor = saved["scaling_factor"]
    print(f"VAE from {found[-1][1]} ({saved['cpu_seconds'] / 60:.1f} CPU minutes)")
    return vae.eval().requires_grad_(False)


def export(args) -> None:
    """<out>/model (EMA weights), or with --weights live the newest checkpoint's own weights, to
    --export in fp16."""
    from diffusion.checkpoints.load import load_stable_diffusion
    models = load_stable_diffusion(args.out / "model")
    if args.weights == "live":
        step, path = list_checkpoints(args.out / "t2i")[-1]
        saved = load_checkpoint(path)
        models.unet.load_state_dict(saved["unet"])
        models.text_encoder.load_state_dict(saved["text_encoder"])
    save_models_folder(models, args.export, dtype=torch.float16)
    print(f"wrote {args.export} ({args.weights} weights, fp16)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/world"), help="run folder (runs/world)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--vae_lr", type=float, default=5e-4)
    parser.add_argument("--vae_decoder_steps", type=int, default=0,
                        help="stage 3: fine-tune the VAE decoder on two-colour objects too (0: no stage 3)")
    parser.add_argument("--vae_decoder_lr", type=float, default=5e-4)
    parser.add_argument("--base", type=Path, default=None,
                        help="a finished model folder: run only stage 3 on its VAE and write <out>/model")
    parser.add_argument("--steps", type=int, default=8000, help="text-to-image steps (8000)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--export", type=Path, default=None,
                        help="only write the finished model (fp16) to this folder")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema",
                        help="with --export: the EMA weights (default) or the last step's")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export is not None:
        export(args)
        return
    if args.base is not None:
        from diffusion.checkpoints.load import load_stable_diffusion
        if args.vae_decoder_steps < 1:
            raise SystemExit("--base runs stage 3 only: give --vae_decoder_steps N")
        models = load_stable_diffusion(args.base)
        models.vae = train_vae_decoder(args, models.vae)
        save_models_folder(models, args.out / "model")
        print(f"wrote {args.out / 'model'}: {args.base} with the fine-tuned VAE decoder")
        return
    vae = load_trained_vae(args)
    if args.vae_decoder_steps:   # the encoder is unchanged, so stage 2 trains on the same latents either way
        vae = train_vae_decoder(args, vae)
    train_t2i(args, World(args.seed), vae)


if __name__ == "__main__":
    main()
