"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word") for Stable Diffusion v1: a new word learned
from a few photos as new rows of the text encoder's token embedding, the model itself frozen. The loop is in
`main`, top to bottom, as named steps (dreambooth/inversion.py, dreambooth/steps.py); the flags are those of
diffusers' examples/textual_inversion/textual_inversion.py.

    python train_textual_inversion.py --pretrained_model_name_or_path stable-diffusion-v1-5/ \\
        --train_data_dir cat-toy/ --placeholder_token "<cat-toy>" --initializer_token toy \\
        --learnable_property object --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 4 \\
        --max_train_steps 3000 --learning_rate 5e-4 --scale_lr --lr_scheduler constant --lr_warmup_steps 0 \\
        --output_dir textual_inversion_cat
    python sample.py --ckpt stable-diffusion-v1-5/ --embedding textual_inversion_cat --prompt "a <cat-toy> backpack"
    torchrun --nproc_per_node 2 train_textual_inversion.py ...   # data parallel: gloo on CPU, NCCL on CUDA

Each step shows a photo (flipped at random) with a prompt made from a template, "a photo of a <cat-toy>" (the
style templates with --learnable_property style), and only the placeholder's rows learn to make the frozen
model denoise it. --num_vectors N gives the word N rows, tokens <cat-toy>, <cat-toy>_1, ...

--output_dir gets learned_embeds.safetensors (diffusers' layout: {placeholder: (N, D)}; diffusers'
load_textual_inversion and sample.py --embedding read it), learned_embeds-steps-<step>.safetensors every
--save_steps, `checkpoint-<step>.pt` training states, `metrics.jsonl`, `validation/` grids, `run_config.toml`
and `run_info.json`.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from clip.textual_inversion import save_embedding, vector_tokens
from common.files import check_writable
from common.precision import MIXED_PRECISION, autocast
from common.run_config import finish_run_record, finite_float, parse_args_with_config, start_run_record
from common.state_dict import CheckpointError
from common.training import (LR_SCHEDULERS, Checkpoints, Distributed, MetricsLog, NonFiniteLoss, StopOnSignal,
                             adamw, add_run_flags, barrier, check_output_dir, check_run_flags, count_steps, fail,
                             fail_run, finish_step, grad_scaler, gradient_sync, learning_rate,
                             report_stale_temporaries, resume, rng_state, save_training_state, seed_everything,
                             setup_distributed, stop_requested, stopped_run, teardown_distributed)
from diffusion.pipeline import encode_prompts
from diffusion.samplers import SAMPLERS
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from dreambooth.data import DataError, add_model_flags, check_model_size, image_files, resolve_base
from dreambooth.inversion import (TEMPLATE_SETS, add_placeholder, check_placeholder, initializer_id,
                                  load_square_image, make_examples, restore_training_state,
                                  train_new_rows, training_state)
from dreambooth.steps import LatentCache, denoising_loss, denoising_prediction, load_models

# The settings that shape a run: resuming with any of them changed needs --allow_config_change.
RUN_SHAPING = ("pretrained_model_name_or_path", "pretrained_config_dir", "variant", "train_data_dir",
               "placeholder_token", "initializer_token", "learnable_property", "template", "num_vectors", "repeats", "resolution",
               "center_crop", "train_batch_size", "gradient_accumulation_steps", "world_size", "learning_rate",
               "scale_lr", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "num_train_epochs", "adam_beta1",
               "adam_beta2", "adam_weight_decay", "adam_epsilon", "mixed_precision", "seed", "cache_latents",
               "prediction_type")
VALIDATION_SAMPLING = dict(steps=25, guidance_scale=7.5)   # the script's validation: 25 steps of DPM-Solver++


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_textual_inversion.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="a TOML file of flag = value lines; flags on the command line override it")
    add_model_flags(a)   # --pretrained_model_name_or_path, --revision, --variant, --pretrained_config_dir
    a("--train_data_dir", help="folder with the photos of the concept (required)")
    a("--placeholder_token", help="the new word, one the tokenizer does not know, e.g. <cat-toy> (required)")
    a("--initializer_token", help="a known word of one token whose embedding starts the new word's rows, e.g. toy "
                                  "(required)")
    a("--learnable_property", default="object", choices=sorted(TEMPLATE_SETS),
      help="the prompts' templates: 'a photo of a {}' ... (object) or 'a painting in the style of {}' ... (style)")
    a("--template", action="append", metavar="TEXT",
      help="a prompt template with {} where the word goes, e.g. 'a {} on a table', used instead of "
           "--learnable_property's set; repeat the flag for several (each example picks one); not in diffusers' script")
    a("--num_vectors", type=int, default=1, help="rows (vectors) of the new word; its tokens are TOKEN, TOKEN_1, ...")
    a("--repeats", type=int, default=100, help="passes over the photos per epoch")
    a("--resolution", type=int, default=512, help="photos are resized to this square")
    a("--center_crop", action="store_true",
      help="cut each photo to its centred square before resizing (default: squeeze the whole photo, as the script)")
    a("--train_batch_size", type=int, default=16, help="examples per process per micro-batch")
    a("--num_train_epochs", type=int, default=100, help="epochs, unless --max_train_steps is set")
    a("--max_train_steps", type=int, default=5000, help="optimizer steps in all (overrides --num_train_epochs)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--cache_latents", action="store_true",
      help="encode each photo (and its mirror image) with the frozen VAE once and keep its posterior (a fresh "
           "sample every step); not in diffusers' script")
    a("--learning_rate", type=finite_float, default=1e-4, help="peak learning rate of AdamW")
    a("--scale_lr", action="store_true", help="multiply the learning rate by the global batch size")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning rate schedule")
    a("--lr_warmup_steps", type=int, default=500, help="linear warmup steps (not used by 'constant')")
    a("--adam_beta1", type=finite_float, default=0.9)
    a("--adam_beta2", type=finite_float, default=0.999)
    a("--adam_weight_decay", type=finite_float, default=1e-2, help="AdamW decoupled weight decay (of the new rows)")
    a("--adam_epsilon", type=finite_float, default=1e-8)
    a("--mixed_precision", default="no", choices=list(MIXED_PRECISION),
      help="autocast dtype of the forward pass; the frozen UNet and VAE are stored in it")
    add_run_flags(a)     # --report_to, checkpoints, --resume_from_checkpoint and what a run may overwrite
    a("--save_steps", type=int, default=500, help="write learned_embeds-steps-<step>.safetensors every N steps")
    a("--output_dir", default="text-inversion-model", help="embeddings, checkpoints, metrics and run record go here")
    a("--seed", type=int, default=0, help="data order, templates, flips, noise, timesteps and validation images")
    a("--validation_prompt", help="prompt (with the placeholder) sampled every --validation_steps")
    a("--num_validation_images", type=int, default=4, help="images per validation grid")
    a("--validation_steps", type=int, default=100, help="validate every N steps")
    a("--sampler", default="dpmpp_2m", help=f"sampler of the validation images: {', '.join(SAMPLERS)} (default "
                                             "dpmpp_2m: the script's DPMSolverMultistepScheduler)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that need neither files nor a model."""
    check_run_flags(args, parser)        # --report_to, checkpoints, --seed, AdamW's and the learning rate's
    for name in ("pretrained_model_name_or_path", "train_data_dir", "placeholder_token", "initializer_token"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")
    for name in ("num_vectors", "repeats", "resolution", "train_batch_size", "num_train_epochs", "max_train_steps",
                 "gradient_accumulation_steps", "save_steps", "num_validation_images", "validation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.sampler not in SAMPLERS:
        parser.error(f"--sampler {args.sampler}: must be one of {', '.join(SAMPLERS)}")
    for template in args.template or []:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            parser.error(f"--template {template!r}: must hold {{}} once (where the word goes) and no other braces")


@dataclass
class Inputs:
    """What `check_inputs` found and read, before any model is loaded."""
    dist: Distributed
    images: list                          # (3, r, r) uint8 each, resized once


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Every input problem, reported before any model is loaded: the photos (each decoded), --resolution against
    the model's configs, the new word and its initializer against the model's tokenizer, the output folder.
    A DataError or ValueError names the flag."""
    args.pretrained_model_name_or_path, args.pretrained_config_dir = resolve_base(args)   # repo ids: the cache's
    files = image_files(args.train_data_dir, flag="--train_data_dir")
    if not files:
        raise DataError(f"--train_data_dir {args.train_data_dir}: no images in this folder")
    check_model_size(args, files)
    tokenizer = read_tokenizer(args.pretrained_model_name_or_path, args.pretrained_config_dir)
    check_placeholder(tokenizer, args.placeholder_token, args.num_vectors)
    initializer_id(tokenizer, args.initializer_token)      # one token of the vocabulary, so never the placeholder
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, resuming=bool(args.resume_from_checkpoint), overwrite=args.overwrite_output_dir)
    check_writable(output_dir, "--output_dir")
    images = [load_square_image(f, args.resolution, center_crop=args.center_crop, flag="--train_data_dir")
              for f in files]
    return Inputs(setup_distributed(args.device), images)


def read_tokenizer(model: str, config_dir: str | None):
    """The model's tokenizer alone, where load_stable_diffusion finds it: a folder's tokenizer/; for a single
    file the --pretrained_config_dir's tokenizer/, else SD v1's (the shipped CLIP vocabulary)."""
    from clip.tokenizer import CLIPTokenizer
    folder = Path(model) if Path(model).is_dir() else Path(config_dir) if config_dir else None
    return CLIPTokenizer.from_pretrained(folder / "tokenizer" if folder and (folder / "tokenizer").is_dir() else None)


def prepare_models(args: argparse.Namespace, inputs: Inputs):
    """The base model on the device with the new word added (its rows copies of the initializer's) and
    everything but those rows frozen. Returns (models, the new rows' module). A DataError names the flag."""
    precision = MIXED_PRECISION[args.mixed_precision]
    try:
        models, _ = load_models(args.pretrained_model_name_or_path, config_dir=args.pretrained_config_dir,
                                resolution=args.resolution, device=inputs.dist.device, precision=precision,
                                variant=args.variant, prediction_type=args.prediction_type)
    except (CheckpointError, OSError, ValueError) as e:
        raise DataError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {e}") from None
    ids = add_placeholder(models, args.placeholder_token, num_vectors=args.num_vectors,
                          initializer=args.initializer_token)
    rows = train_new_rows(models, first=ids[0], gradient_checkpointing=args.gradient_checkpointing,
                          precision=precision)
    return models, rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args, parser)
    output_dir, precision = Path(args.output_dir), MIXED_PRECISION[args.mixed_precision]
    try:
        inputs = check_inputs(args)          # every input problem is reported here, before any model is loaded
    except (DataError, ValueError) as e:
        return fail(str(e))
    dist = inputs.dist
    report_stale_temporaries(dist, output_dir)
    seed_everything(args.seed)
    try:
        models, rows = prepare_models(args, inputs)
    except DataError as e:
        return fail(str(e), dist)
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(models.scheduler_config))

    # ---- the optimizer (the new rows only), the schedule of steps, resume --------------------------------
    B, accumulation = args.train_batch_size, args.gradient_accumulation_steps
    global_batch = B * accumulation * dist.world_size
    epoch_length = len(inputs.images) * args.repeats           # the script's dataset: every photo --repeats times
    peak_lr = args.learning_rate * (global_batch if args.scale_lr else 1)   # --scale_lr: x the global batch
    optimizer = adamw([rows.rows], lr=peak_lr, betas=(args.adam_beta1, args.adam_beta2),
                      weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scaler = grad_scaler(dist.device, precision)
    run_settings = {**vars(args), "world_size": dist.world_size}
    checkpoints = Checkpoints(output_dir, total_limit=args.checkpoints_total_limit)
    try:   # at least one global batch; resume the rows, optimizer, scaler, step, RNG (the data follow the step)
        steps_per_epoch, max_steps = count_steps(epoch_length, global_batch=global_batch, what="training examples "
                                                 "(photos x --repeats)", max_train_steps=args.max_train_steps,
                                                 num_train_epochs=args.num_train_epochs)
        step, skipped = resume(checkpoints, args.resume_from_checkpoint, run_settings=run_settings,
                               run_shaping=RUN_SHAPING, allow_change=args.allow_config_change,
                               restore=partial(restore_training_state, rows=rows, optimizer=optimizer,
                                               scaler=scaler)) or (0, 0)
    except ValueError as e:
        return fail(str(e), dist)

    text_encoder_ddp = DDP(models.text_encoder) if dist.enabled else models.text_encoder   # averages the rows' grads
    log = MetricsLog(output_dir, enabled=dist.is_main, report_to=args.report_to, start_step=step)
    info = (start_run_record(output_dir, args, parser, device=str(dist.device), world_size=dist.world_size,
                             dtype=precision, argv=argv) if dist.is_main else None)
    ending = dict(dist=dist, log=log, output_dir=output_dir, info=info)     # what fail_run and stopped_run record
    latent_cache = LatentCache(models.vae, precision) if args.cache_latents else None
    templates = args.template or TEMPLATE_SETS[args.learnable_property]
    placeholder = " ".join(vector_tokens(args.placeholder_token, args.num_vectors))   # "tok tok_1 ...", as the script

    # ---- the loop ---------------------------------------------------------------------------------------
    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    stopped_by = None
    with StopOnSignal() as stop:
        while step < max_steps and stopped_by is None:
            t0 = time.perf_counter()
            epoch, s = divmod(step, steps_per_epoch)
            order = torch.randperm(epoch_length, generator=torch.Generator().manual_seed(args.seed + epoch))
            loss_sum = torch.zeros(1, device=dist.device)
            for micro in range(accumulation):
                # This process's share of the global batch: B examples at these positions of the epoch.
                first = s * global_batch + (micro * dist.world_size + dist.rank) * B
                batch, prompts = make_examples(range(first, first + B), order=order, epoch=epoch, seed=args.seed,
                                               images=inputs.images, templates=templates, placeholder=placeholder)
                batch.pixels = batch.pixels.to(dist.device)                  # (B, 3, r, r)
                # The new rows' gradients are all-reduced over processes on the last micro-batch only.
                with gradient_sync([text_encoder_ddp], sync=micro == accumulation - 1):
                    with autocast(precision, dist.device):
                        states = encode_prompts(text_encoder_ddp, models.tokenizer, prompts, dist.device)
                    pred, target, _ = denoising_prediction(models.unet, models.vae, schedule, batch, states,
                                                           precision=precision, offset_noise=False,
                                                           latent_cache=latent_cache)
                    loss = denoising_loss(pred, target)      # Gal et al. eq. 2: only the word's rows move
                    scaler.scale(loss / accumulation).backward()
                loss_sum += loss.detach()

            lr = learning_rate(step, total=max_steps, peak=peak_lr, schedule=args.lr_scheduler,
                               warmup=args.lr_warmup_steps)
            try:   # the optimizer step (no clipping, as the script), or a non-finite loss's verdict
                record = finish_step(loss_sum, names=("loss",), micro_batches=accumulation, step=step,
                                     skipped=skipped, lr=lr, dist=dist, optimizer=optimizer, scaler=scaler,
                                     params=[rows.rows], max_grad_norm=0, skip_nonfinite=args.skip_nonfinite_steps)
            except NonFiniteLoss as e:
                return fail_run(str(e), reason="non-finite loss", **ending, step=step)
            step, skipped = record["step"], record["skipped_nonfinite_steps"]
            log.log({**record, "epoch": epoch, "step_time_s": time.perf_counter() - t0,
                     "rows_norm": rows.rows.detach().norm(dim=1).mean().item()})
            bar.update(1)
            bar.set_postfix(loss=record["loss"], lr=f"{lr:.2e}")

            if stop_requested(stop, dist):
                stopped_by = stop.signum or 15
            if step % args.checkpointing_steps == 0 or (stopped_by and step < max_steps):
                state = training_state(rows, optimizer, scaler, step=step, rng=rng_state(), run_settings=run_settings)
                error = save_training_state(dist, checkpoints, step, {**state, "skipped_nonfinite_steps": skipped})
                if error is not None:   # a full disk, say: the previous checkpoint is intact
                    return fail_run(error, reason=error, **ending, step=step)
            if step % args.save_steps == 0 and step < max_steps and dist.is_main:
                save_embedding(output_dir / f"learned_embeds-steps-{step}.safetensors", args.placeholder_token,
                               rows.rows)
            if step % args.validation_steps == 0:
                validate(dist, models, args, output_dir, step)
    bar.close()

    if stopped_by and step < max_steps:
        return stopped_run(stopped_by, **ending, step=step)
    if dist.is_main:
        written = save_embedding(output_dir / "learned_embeds.safetensors", args.placeholder_token, rows.rows)
        print(f"embedding written to {written} (use: python sample.py --ckpt {args.pretrained_model_name_or_path} "
              f"--embedding {written} --prompt '... {args.placeholder_token} ...')")
        finish_run_record(output_dir, info, step=step)
    log.close()
    teardown_distributed(dist)
    return 0


def validate(dist, models, args, output_dir: Path, step: int) -> None:
    """--num_validation_images of --validation_prompt (the new word spelled out as the pipeline does), one fixed
    seed, saved as one grid."""
    if dist.is_main and args.validation_prompt:
        from diffusion.pipeline import NonFiniteError, generate, make_grid
        try:
            images = generate(models, [args.validation_prompt], num_images_per_prompt=args.num_validation_images,
                              height=args.resolution, width=args.resolution, seed=args.seed, progress=False,
                              autocast=MIXED_PRECISION[args.mixed_precision], output="pil", sampler=args.sampler,
                              **VALIDATION_SAMPLING)
        except NonFiniteError as e:   # said, and training goes on: the loss decides whether the run is broken
            print(f"warning: validation at step {step}: {e}", file=sys.stderr)
            images = None
        if images is not None:
            (output_dir / "validation").mkdir(exist_ok=True)
            make_grid(images).save(output_dir / "validation" / f"step-{step:06d}.png")
    barrier(dist)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        sys.exit(main())
