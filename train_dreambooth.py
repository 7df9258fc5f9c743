"""DreamBooth (Ruiz et al. 2022) for Stable Diffusion v1, 2.x and SDXL, with class-prior preservation. The loop
is in `main`, top to bottom, as named steps (dreambooth/steps.py); the flags are those of diffusers'
examples/dreambooth/train_dreambooth.py (SDXL: train_dreambooth_lora_sdxl.py).

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
load it; parts neither trained nor changed by --lora are copied as they came), plus with
--save_single_file `<name>.safetensors` in the original single-file layout (fp16, weights only),
`checkpoint-<step>.pt` training states, `metrics.jsonl`, `validation/` grids, `run_config.toml` and
`run_info.json`. With --rank R the run trains a LoRA instead (diffusers' train_dreambooth_lora.py) and
writes pytorch_lora_weights.safetensors. With --lora FILE[:SCALE] (as sample.py's) the base is the model
with those LoRA files fused in.

SDXL trains a LoRA only (--rank; full fine-tuning is refused with the memory it would take), as diffusers'
train_dreambooth_lora_sdxl.py with its defaults (--resolution 1024, --learning_rate 1e-4, --text_encoder_lr
5e-6, AdamW weight decay 1e-4 and 1e-3 for the text encoders): both text encoders condition the UNet
(--train_text_encoder adapts both), and each crop's size and crop micro-conditioning comes from its image
(docs/sdxl.md, "DreamBooth-LoRA").
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from clip.textual_inversion import (add_embeddings, expand_prompt, expand_prompts, parse_embedding_flags, read_embeddings,
                                    remove_embeddings, save_embeddings)
from common.files import check_writable
from common.precision import DTYPES, MIXED_PRECISION, autocast, check_device_runs, slow_precision_warning
from common.run_config import finish_run_record, finite_float, parse_args_with_config, start_run_record
from common.state_dict import CheckpointError
from common.training import (LR_SCHEDULERS, Checkpoints, Distributed, MetricsLog, NonFiniteLoss, StopOnSignal,
                             adamw, add_run_flags, barrier, check_output_dir, check_run_flags, count_steps, fail,
                             fail_run, finish_step, grad_scaler, gradient_sync, learning_rate,
                             report_stale_temporaries, resume, rng_state, save_training_state, seed_everything,
                             setup_distributed, stop_requested, stopped_run, teardown_distributed)
from diffusion.checkpoints.lora_files import load_lora_files, parse_lora_flags, save_lora_files
from diffusion.pipeline import NonFiniteError
from diffusion.samplers import SAMPLERS
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from dreambooth.data import (DataError, add_model_flags, check_model_size, generate_class_images, image_files,
                             image_size, load_image, missing_class_indices, resolve_base)
from dreambooth.steps import (OFFSET_NOISE_SCALE, LatentCache, added_conditioning, denoising_loss,
                              denoising_prediction, encode, load_models, make_batch, parameter_groups,
                              restore_training_state, text_parts, trainable_parameters, training_state)

# The settings that shape a run: resuming with any of them changed needs --allow_config_change.
RUN_SHAPING = ("pretrained_model_name_or_path", "pretrained_config_dir", "instance_data_dir", "instance_prompt",
               "class_data_dir", "class_prompt", "with_prior_preservation", "prior_loss_weight", "num_class_images",
               "train_text_encoder", "resolution", "center_crop", "train_batch_size", "gradient_accumulation_steps",
               "world_size", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
               "num_train_epochs", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
               "mixed_precision", "seed", "offset_noise", "snr_gamma", "snr_weight_prior", "snr_v_paper", "rank",
               "lora", "cache_latents", "variant", "embedding", "prediction_type", "text_encoder_lr",
               "adam_weight_decay_text_encoder")
CLASS_SAMPLING = dict(steps=50, guidance_scale=7.5)        # StableDiffusionPipeline's defaults, as diffusers uses
VALIDATION_SAMPLING = dict(steps=25, guidance_scale=7.5)   # diffusers' DreamBooth validation settings
LEARNING_RATE = {"full": 5e-6, "lora": 5e-4}   # train_dreambooth.py's and train_dreambooth_lora.py's defaults
# train_dreambooth_lora_sdxl.py's defaults where they differ from the SD scripts' (None: as the SD scripts).
SDXL_DEFAULTS = dict(learning_rate=1e-4, text_encoder_lr=5e-6, adam_weight_decay=1e-4, adam_weight_decay_text_encoder=1e-3)
SD_DEFAULTS = dict(adam_weight_decay=1e-2)
LOSS_NAMES = ("loss", "instance_loss", "prior_loss")   # metrics.jsonl: the loss and its parts (prior: eq. 2's)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_dreambooth.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="a TOML file of flag = value lines; flags on the command line override it")
    add_model_flags(a)   # --pretrained_model_name_or_path, --revision, --variant, --pretrained_config_dir,
                         # --prediction_type
    a("--instance_data_dir", help="folder with the photos of the subject (required)")
    a("--instance_prompt", help="prompt with the identifier, e.g. 'a photo of sks dog' (required)")
    a("--class_data_dir", help="class images; the missing ones are generated here by the base model")
    a("--class_prompt", help="prompt of the class, e.g. 'a photo of dog'")
    a("--with_prior_preservation", action="store_true", help="add the class-prior preservation loss")
    a("--prior_loss_weight", type=finite_float, default=1.0, help="weight of the prior preservation loss")
    a("--num_class_images", type=int, default=100, help="class images wanted in --class_data_dir")
    a("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    a("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
      help="the weights' dtype while generating class images, as diffusers' torch_dtype (default, and 'no': "
           "fp32 on a CPU, fp16 on a GPU, as diffusers)")
    a("--sampler", default="ddim", help=f"sampler of the class and validation images: {', '.join(SAMPLERS)} "
                                         "(as sample.py; default ddim)")
    a("--plms", action="store_true", help="the same as --sampler plms (as sample.py)")
    a("--train_text_encoder", action="store_true", help="fine-tune the text encoder too")
    a("--resolution", type=int, help="training images are resized and cropped to this square (default 512; SDXL "
                                      "1024)")
    a("--center_crop", action="store_true", help="crop at the centre (default: at a random offset)")
    a("--train_batch_size", type=int, default=4, help="instance images per process per micro-batch")
    a("--num_train_epochs", type=int, default=1, help="epochs, unless --max_train_steps is set")
    a("--max_train_steps", type=int, help="optimizer steps in all (overrides --num_train_epochs)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    a("--cache_latents", action="store_true",
      help="encode each crop with the frozen VAE once and keep its posterior (a fresh sample every step)")
    a("--learning_rate", type=finite_float,
      help=f"peak learning rate of AdamW (default {LEARNING_RATE['full']}; with --rank {LEARNING_RATE['lora']})")
    a("--scale_lr", action="store_true", help="multiply the learning rate by the global batch size")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning rate schedule")
    a("--lr_warmup_steps", type=int, default=500, help="linear warmup steps (not used by 'constant')")
    a("--max_grad_norm", type=finite_float, default=1.0, help="clip the global gradient norm to this (0: no clipping)")
    a("--adam_beta1", type=finite_float, default=0.9)
    a("--adam_beta2", type=finite_float, default=0.999)
    a("--adam_weight_decay", type=finite_float, help="AdamW decoupled weight decay (default 1e-2; SDXL 1e-4)")
    a("--text_encoder_lr", type=finite_float, help="with --train_text_encoder: the text encoders' peak learning rate "
                                                   "(default: --learning_rate's; SDXL 5e-6, as train_dreambooth_lora_sdxl.py)")
    a("--adam_weight_decay_text_encoder", type=finite_float,
      help="with --train_text_encoder: the text encoders' weight decay (default: --adam_weight_decay's; SDXL 1e-3)")
    a("--adam_epsilon", type=finite_float, default=1e-8)
    a("--mixed_precision", default="no", choices=list(MIXED_PRECISION), help="autocast dtype of the forward pass")
    add_run_flags(a)     # --report_to, checkpoints, --resume_from_checkpoint and what a run may overwrite
    a("--output_dir", default="dreambooth-model", help="model, checkpoints, metrics and run record go here")
    a("--seed", type=int, default=0, help="data order, crops, noise, timesteps, class and validation images")
    a("--validation_prompt", help="prompt sampled every --validation_steps")
    a("--num_validation_images", type=int, default=4, help="images per validation grid")
    a("--validation_steps", type=int, default=100, help="validate every N steps")
    a("--offset_noise", action="store_true", help=f"add {OFFSET_NOISE_SCALE} x per-channel offset noise")
    a("--snr_gamma", type=finite_float, help="min-SNR loss weighting with this gamma (5.0 is recommended), of the "
                                             "instance loss, as diffusers' train_dreambooth.py")
    a("--snr_weight_prior", action="store_true",
      help="with --snr_gamma: weight the class images' loss by min-SNR too (diffusers weights the instance loss only)")
    a("--snr_v_paper", action="store_true",
      help="with --snr_gamma on a v-prediction model: the paper's weight min(SNR, gamma) / (SNR + 1), as diffusers' "
           "train_text_to_image.py, instead of train_dreambooth.py's min(SNR, gamma) / SNR + 1")
    a("--save_single_file", action="store_true", help="also write the original single-file layout (fp16)")
    a("--rank", type=int, help="train a LoRA of this rank (diffusers' train_dreambooth_lora.py uses 4) instead "
                               "of the whole UNet; writes OUTPUT_DIR/pytorch_lora_weights.safetensors")
    a("--lora_format", default="diffusers", choices=["diffusers", "kohya"],
      help="with --rank: 'kohya' also writes pytorch_lora_weights_kohya.safetensors (A1111/ComfyUI keys)")
    a("--lora", action="append", metavar="FILE[:SCALE]",
      help="train on top of the base with this LoRA file (diffusers or kohya format) fused in at SCALE (default "
           "1.0), as sample.py --lora applies it; repeat the flag to stack LoRAs")
    a("--lora_skip_unknown", action="store_true",
      help="with --lora: skip (and print) LoRA keys that match no module, instead of refusing the file")
    a("--embedding", action="append", metavar="FILE[:TOKEN]",
      help="train on top of this textual-inversion embedding, its word added as sample.py --embedding adds it (the "
           "prompts may use it); repeatable. With --train_text_encoder its rows train too and are written to "
           "OUTPUT_DIR/embeddings/")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that need neither files nor a model."""
    check_run_flags(args, parser)        # --report_to, checkpoints, --seed, AdamW's and the learning rate's
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")
    if args.with_prior_preservation and not args.class_prompt:
        parser.error("--with_prior_preservation needs --class_prompt (the prompt of the class images)")
    if args.with_prior_preservation and not args.class_data_dir:
        parser.error("--with_prior_preservation needs --class_data_dir (where the class images are kept)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "resolution",
                 "sample_batch_size", "num_validation_images", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps {args.max_train_steps}: must be at least 1")
    if args.with_prior_preservation and args.num_class_images < 1:
        parser.error(f"--num_class_images {args.num_class_images}: must be at least 1")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank {args.rank}: the LoRA rank must be at least 1")
    if args.lora_format != "diffusers" and args.rank is None:
        parser.error(f"--lora_format {args.lora_format}: needs --rank (a LoRA run)")
    if args.rank is not None and args.save_single_file:
        parser.error("--save_single_file: a LoRA run (--rank) writes LoRA files, not a whole model")
    try:
        parse_lora_flags(args.lora or [])
    except ValueError as e:
        parser.error(str(e))
    if args.lora_skip_unknown and not args.lora:
        parser.error("--lora_skip_unknown: needs --lora (a LoRA file to fuse into the base)")
    for name in ("max_grad_norm", "prior_loss_weight", "adam_weight_decay_text_encoder"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 0")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        parser.error(f"--snr_gamma {args.snr_gamma}: must be > 0")
    if args.prior_loss_weight > 1e6:   # float32 keeps 24 bits: the instance loss would vanish in the sum's rounding
        parser.error(f"--prior_loss_weight {args.prior_loss_weight}: must be at most 1e6 (beyond it the instance "
                     "loss is lost in float32's rounding of the sum; diffusers' default is 1)")
    for name in ("snr_weight_prior", "snr_v_paper"):
        if getattr(args, name) and args.snr_gamma is None:
            parser.error(f"--{name}: needs --snr_gamma (the min-SNR weighting it changes)")
    if args.sampler not in SAMPLERS:
        parser.error(f"--sampler {args.sampler}: must be one of {', '.join(SAMPLERS)}")
    if args.plms and args.sampler not in ("ddim", "plms"):
        parser.error(f"--plms cannot be used with --sampler {args.sampler}: --plms means --sampler plms")
    if args.plms:
        args.sampler = "plms"   # recorded so in the run config
    if args.text_encoder_lr is not None and args.text_encoder_lr <= 0:
        parser.error(f"--text_encoder_lr {args.text_encoder_lr}: must be > 0")


def family_defaults(args: argparse.Namespace, *, sdxl: bool) -> None:
    """The flags left unset that the model family decides: the learning rate (train_dreambooth.py's, or
    train_dreambooth_lora.py's with --rank; SDXL: train_dreambooth_lora_sdxl.py's), the weight decays and the
    text encoders' learning rate (SDXL_DEFAULTS); and what SDXL does not take. A ValueError names the flag."""
    defaults = {**SD_DEFAULTS, **(SDXL_DEFAULTS if sdxl else {})}
    defaults.setdefault("learning_rate", LEARNING_RATE["full" if args.rank is None else "lora"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if sdxl and args.lora_format == "kohya":
        raise ValueError("--lora_format kohya: not written for SDXL yet (its kohya names are sgm's blocks); "
                         "the diffusers file loads in diffusers, ComfyUI and A1111 alike")
    if sdxl and args.embedding:
        raise ValueError(f"--embedding {args.embedding[0]}: textual-inversion embeddings on SDXL (one per text "
                         "encoder) are not supported by train_dreambooth.py")


@dataclass
class Inputs:
    """What `check_inputs` found and read, before any model is loaded."""
    dist: Distributed
    instance_images: list                 # (3, H, W) uint8 each
    instance_sizes: list                  # (height, width) of each file, before resizing: SDXL's original size
    missing: list                         # indices of the class images still to generate
    generation_precision: str             # "fp32", "bf16" or "fp16": the dtype they are generated in
    embeddings: list = field(default_factory=list)   # --embedding files, read (clip/textual_inversion.py)
    sdxl: bool = False                    # the configs say SDXL (a .ckpt's family is known once it is read)


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Every input problem, reported before any model is loaded: the instance photos (each decoded),
    --resolution against the model's configs, the output and class folders, and the dtype the missing
    class images would be made in. A DataError or ValueError names the flag."""
    args.pretrained_model_name_or_path, args.pretrained_config_dir = resolve_base(args)   # repo ids: the cache's
    output_dir, class_dir = Path(args.output_dir), Path(args.class_data_dir or ".")
    instance_files = image_files(args.instance_data_dir, flag="--instance_data_dir")
    if not instance_files:
        raise DataError(f"--instance_data_dir {args.instance_data_dir}: no images in this folder")
    configs = check_model_size(args, instance_files)      # --resolution, --rank and the memory the sizes need
    sdxl = configs is not None and configs[0].addition_embed_type is not None
    family_defaults(args, sdxl=sdxl)
    check_output_dir(output_dir, resuming=bool(args.resume_from_checkpoint), overwrite=args.overwrite_output_dir)
    check_writable(output_dir, "--output_dir")
    missing = missing_class_indices(class_dir, args.num_class_images) if args.with_prior_preservation else []
    if missing:
        check_writable(class_dir, "--class_data_dir")
    instance_images = [load_image(f, args.resolution, flag="--instance_data_dir") for f in instance_files]
    instance_sizes = [image_size(f, flag="--instance_data_dir") for f in instance_files]
    try:
        embeddings = read_embeddings(parse_embedding_flags(args.embedding or []))
    except ValueError as e:
        raise DataError(f"--embedding {e}") from None
    dist = setup_distributed(args.device)
    # class images in the dtype diffusers would use: --prior_generation_precision, else fp32 on a CPU, fp16 on a GPU
    generation_precision = (args.prior_generation_precision if args.prior_generation_precision not in (None, "no")
                            else "fp32" if dist.device.type == "cpu" else "fp16")
    if missing:
        flag = "--prior_generation_precision"
        check_device_runs(DTYPES[generation_precision], dist.device, flag=flag)
        if dist.is_main and (warning := slow_precision_warning(DTYPES[generation_precision], dist.device, flag=flag)):
            print(warning, file=sys.stderr)
    return Inputs(dist, instance_images, instance_sizes, missing, generation_precision, embeddings, sdxl)


def prepare_models(args: argparse.Namespace, inputs: Inputs):
    """The base model on the device, with the --lora files fused in (read and checked first, as sample.py
    does), for everything that follows: class images, training, and a resumed run alike; then the class
    images it generates where --class_data_dir lacks them (one fixed seed per index), read back.
    Returns (models, the memory layouts chosen, the parts the --lora files changed, the class images, and
    their sizes before resizing).
    A DataError names the flag of what does not load."""
    dist, missing, precision = inputs.dist, inputs.missing, MIXED_PRECISION[args.mixed_precision]
    generation_dtype = DTYPES[inputs.generation_precision]
    # With --rank the frozen base is kept in the training precision (diffusers' weight_dtype): it is read
    # in that dtype straight from the file, with no fp32 copy on the way, unless it is needed in fp32
    # first (--lora files are fused in fp32; fp32 class images still to make use the same copy), in
    # which case trainable_parameters casts it after. SDXL is read in fp32 and cast after, as
    # train_dreambooth_lora_sdxl.py does: its VAE trains from the file's fp32 weights.
    needs_fp32 = bool(args.lora) or (bool(missing) and generation_dtype == torch.float32) or inputs.sdxl
    weights_dtype = DTYPES[precision] if args.rank is not None and not needs_fp32 else torch.float32
    load = dict(config_dir=args.pretrained_config_dir, resolution=args.resolution, device=dist.device,
                variant=args.variant, prediction_type=args.prediction_type)
    try:
        models, layouts = load_models(args.pretrained_model_name_or_path, **load, precision=precision,
                                      dtype=weights_dtype, rank=args.rank, train_text_encoder=args.train_text_encoder)
    except (CheckpointError, OSError, ValueError) as e:
        raise DataError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {e}") from None
    lora_files, lora_changed = parse_lora_flags(args.lora or []), set()
    if lora_files:
        try:
            lora_changed, skipped_keys = load_lora_files(models, lora_files, skip_unknown=args.lora_skip_unknown)
        except (CheckpointError, OSError) as e:
            raise DataError(f"--lora {e}") from None
        for key in skipped_keys if dist.is_main else []:
            print(f"--lora_skip_unknown: skipped {key}", file=sys.stderr)
    add_words(models, inputs.embeddings)
    class_dir = Path(args.class_data_dir or ".")
    if missing:   # the base model itself, or a copy of it in --prior_generation_precision's dtype
        generation_models = models if generation_dtype == weights_dtype else load_models(
            args.pretrained_model_name_or_path, **load, precision=inputs.generation_precision,
            dtype=generation_dtype)[0]
        if generation_models is not models and lora_files:   # the same base: the files fused into the copy too
            load_lora_files(generation_models, lora_files, skip_unknown=args.lora_skip_unknown)
        if generation_models is not models:
            add_words(generation_models, inputs.embeddings)
        try:
            generate_class_images(generation_models, class_dir, missing,
                                  prompt=expand_prompt(args.class_prompt, generation_models.tokenizer),
                                  resolution=args.resolution, seed=args.seed, batch_size=args.sample_batch_size,
                                  share=(dist.rank, dist.world_size), progress=dist.is_main,
                                  sampler=args.sampler, **CLASS_SAMPLING)
        except NonFiniteError as e:   # e.g. a base model that overflows in fp16: no black class image is written
            raise DataError(f"class images in --prior_generation_precision {inputs.generation_precision}: "
                            f"{e}") from None
        del generation_models
    barrier(dist)
    class_files = image_files(class_dir, flag="--class_data_dir")[:args.num_class_images] if args.with_prior_preservation else []
    class_images = [load_image(f, args.resolution, flag="--class_data_dir") for f in class_files]
    class_sizes = [image_size(f, flag="--class_data_dir") for f in class_files]
    return models, layouts, lora_changed, class_images, class_sizes


def add_words(models, embeddings: list) -> None:
    """--embedding: the words taught to the tokenizer, their rows appended to the token embedding."""
    try:
        add_embeddings(models.text_encoder, models.tokenizer, embeddings)
    except ValueError as e:
        raise DataError(f"--embedding {e}") from None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB: the peak RSS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args, parser)
    output_dir, precision = Path(args.output_dir), MIXED_PRECISION[args.mixed_precision]
    prior = args.with_prior_preservation
    try:
        inputs = check_inputs(args)          # every input problem is reported here, before any model is loaded
    except (DataError, ValueError) as e:
        return fail(str(e))
    dist = inputs.dist
    report_stale_temporaries(dist, output_dir, Path(args.class_data_dir or "."))
    seed_everything(args.seed)
    try:
        models, layouts, lora_changed, class_images, class_sizes = prepare_models(args, inputs)
    except DataError as e:
        return fail(str(e), dist)
    # SDXL: each crop's micro-conditioning comes from its image's size before resizing (make_batch)
    original_sizes = {"instance": inputs.instance_sizes, "class": class_sizes} if models.is_sdxl else None
    schedule = NoiseSchedule(config=ScheduleConfig.from_dict(models.scheduler_config))

    # ---- what is trained, the optimizer, the schedule of steps, resume ----------------------------------
    params = trainable_parameters(models, train_text_encoder=args.train_text_encoder,
                                  gradient_checkpointing=args.gradient_checkpointing, rank=args.rank,
                                  precision=precision)
    B, accumulation = args.train_batch_size, args.gradient_accumulation_steps
    global_batch = B * accumulation * dist.world_size
    # As diffusers: an epoch pairs instance i % n_inst with class image i % n_class, for max(n_inst, n_class) i.
    epoch_length = max(len(inputs.instance_images), len(class_images))
    peak_lr = args.learning_rate * (global_batch if args.scale_lr else 1)   # --scale_lr: x the global batch
    groups = parameter_groups(models, params, lr=peak_lr, weight_decay=args.adam_weight_decay,   # SDXL: the text
                              text_encoder_lr=args.text_encoder_lr,                            # encoders' own
                              text_encoder_weight_decay=args.adam_weight_decay_text_encoder)
    optimizer = adamw(groups, lr=peak_lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scaler = grad_scaler(dist.device, precision)
    run_settings = {**vars(args), "world_size": dist.world_size}
    checkpoints = Checkpoints(output_dir, total_limit=args.checkpoints_total_limit)
    saved = dict(train_text_encoder=args.train_text_encoder, lora_only=args.rank is not None)
    try:   # at least one global batch; resume weights, optimizer, scaler, step, RNG (the data follow the step)
        steps_per_epoch, max_steps = count_steps(epoch_length, global_batch=global_batch, what="training examples",
                                                 max_train_steps=args.max_train_steps,
                                                 num_train_epochs=args.num_train_epochs)
        step, skipped = resume(checkpoints, args.resume_from_checkpoint, run_settings=run_settings,
                               run_shaping=RUN_SHAPING, allow_change=args.allow_config_change,
                               restore=partial(restore_training_state, models=models, optimizer=optimizer,
                                               scaler=scaler, **saved)) or (0, 0)
    except ValueError as e:
        return fail(str(e), dist)

    # DDP averages the gradients over processes in backward. SDXL reads its first text encoder's penultimate
    # states: the last layer's LoRA gets no gradient, which DDP must be told of (as the script's find_unused_parameters).
    unet_ddp = DDP(models.unet) if dist.enabled else models.unet
    text_encoders_ddp = [DDP(m, static_graph=models.is_sdxl) if dist.enabled and args.train_text_encoder
                         else m for m in models.text_encoders]
    log = MetricsLog(output_dir, enabled=dist.is_main, report_to=args.report_to, start_step=step)
    info = (start_run_record(output_dir, args, parser, device=str(dist.device), world_size=dist.world_size,
                             dtype=precision, argv=argv, memory_format=layouts) if dist.is_main else None)
    ending = dict(dist=dist, log=log, output_dir=output_dir, info=info)     # what fail_run and stopped_run record
    vae_precision = "fp32" if models.is_sdxl and models.vae.config.force_upcast else precision   # SDXL: fp32 VAE
    latent_cache = LatentCache(models.vae, vae_precision) if args.cache_latents else None
    prompts = expand_prompts([args.instance_prompt] * B + ([args.class_prompt] * B if prior else []),
                             models.tokenizer)   # an --embedding's multi-vector word spelled out, as sample.py does
    weighting = dict(schedule=schedule, snr_gamma=args.snr_gamma, snr_v_paper=args.snr_v_paper)   # --snr_gamma
    prior_weighting = weighting if args.snr_weight_prior else {}   # as diffusers: the class images' plain MSE

    # ---- the loop ---------------------------------------------------------------------------------------
    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    stopped_by = None
    with StopOnSignal() as stop:
        while step < max_steps and stopped_by is None:
            t0 = time.perf_counter()
            epoch, s = divmod(step, steps_per_epoch)
            order = torch.randperm(epoch_length, generator=torch.Generator().manual_seed(args.seed + epoch))
            sums = torch.zeros(2 + prior, device=dist.device)          # loss, instance loss (, prior loss)
            for micro in range(accumulation):
                # This process's share of the global batch: B examples at these positions of the epoch.
                first = s * global_batch + (micro * dist.world_size + dist.rank) * B
                batch = make_batch(range(first, first + B), order=order, epoch=epoch, seed=args.seed,
                                   instance_images=inputs.instance_images, class_images=class_images,
                                   resolution=args.resolution, center_crop=args.center_crop,
                                   original_sizes=original_sizes)
                batch.pixels = batch.pixels.to(dist.device)               # (N, 3, r, r), N = B or 2B
                # Gradients are all-reduced over processes on the last micro-batch only.
                with gradient_sync([unet_ddp, *text_encoders_ddp], sync=micro == accumulation - 1):
                    with torch.set_grad_enabled(args.train_text_encoder), autocast(precision, dist.device):
                        states, pooled = encode(text_encoders_ddp, models, prompts, dist.device)   # SDXL: 2 towers
                    pred, target, t = denoising_prediction(unet_ddp, models.vae, schedule, batch, states,
                                                           precision=precision, offset_noise=args.offset_noise,
                                                           latent_cache=latent_cache, vae_precision=vae_precision,
                                                           added=added_conditioning(pooled, batch))   # SDXL's
                    instance_loss = denoising_loss(pred[:B], target[:B], t[:B], **weighting)
                    prior_loss = denoising_loss(pred[B:], target[B:], t[B:], **prior_weighting) if prior else 0.0
                    # DreamBooth eq. 2: the instance loss plus lambda times the loss on the class images.
                    loss = instance_loss + args.prior_loss_weight * prior_loss
                    scaler.scale(loss / accumulation).backward()
                sums += torch.stack([loss, instance_loss, prior_loss][:2 + prior]).detach()

            lr = learning_rate(step, total=max_steps, peak=peak_lr, schedule=args.lr_scheduler,
                               warmup=args.lr_warmup_steps)
            try:   # the optimizer step, or a non-finite loss's verdict; the same on every process
                record = finish_step(sums, names=LOSS_NAMES, micro_batches=accumulation, step=step, skipped=skipped,
                                     lr=lr, dist=dist, optimizer=optimizer, scaler=scaler, params=params,
                                     max_grad_norm=args.max_grad_norm, skip_nonfinite=args.skip_nonfinite_steps)
            except NonFiniteLoss as e:
                return fail_run(str(e), reason="non-finite loss", **ending, step=step)
            step, skipped = record["step"], record["skipped_nonfinite_steps"]
            log.log({**record, "epoch": epoch, "step_time_s": time.perf_counter() - t0,
                     "peak_memory_mb": peak_memory_mb(dist.device)})
            bar.update(1)
            bar.set_postfix(loss=record["loss"], lr=f"{lr:.2e}")

            if stop_requested(stop, dist):
                stopped_by = stop.signum or 15
            if step % args.checkpointing_steps == 0 or (stopped_by and step < max_steps):
                state = training_state(models, optimizer, scaler, step=step, rng=rng_state(),
                                       run_settings=run_settings, **saved)
                error = save_training_state(dist, checkpoints, step, {**state, "skipped_nonfinite_steps": skipped})
                if error is not None:   # a full disk, say: the previous checkpoint is intact
                    return fail_run(error, reason=error, **ending, step=step)
            if step % args.validation_steps == 0:
                validate(dist, models, args, output_dir, step)
    bar.close()

    if stopped_by and step < max_steps:
        return stopped_run(stopped_by, **ending, step=step)
    if dist.is_main:
        export(models, args, output_dir, changed=lora_changed, embeddings=inputs.embeddings)
        finish_run_record(output_dir, info, step=step)
    log.close()
    teardown_distributed(dist)
    return 0


def validate(dist, models, args, output_dir: Path, step: int) -> None:
    """--num_validation_images of --validation_prompt, one fixed seed, saved as one grid."""
    if dist.is_main and args.validation_prompt:
        from diffusion.pipeline import generate, make_grid
        models.unet.eval()
        for text_encoder in models.text_encoders:
            text_encoder.eval()
        try:
            images = generate(models, [args.validation_prompt], num_images_per_prompt=args.num_validation_images,
                              height=args.resolution, width=args.resolution, seed=args.seed, progress=False,
                              autocast=MIXED_PRECISION[args.mixed_precision], output="pil",
                              sampler=args.sampler, **VALIDATION_SAMPLING)
        except NonFiniteError as e:   # said, and training goes on: the loss decides whether the run is broken
            print(f"warning: validation at step {step}: {e}", file=sys.stderr)
            images = None
        models.unet.train()
        for text_encoder in models.text_encoders:
            text_encoder.train(args.train_text_encoder)
        if images is not None:
            (output_dir / "validation").mkdir(exist_ok=True)
            make_grid(images).save(output_dir / "validation" / f"step-{step:06d}.png")
    barrier(dist)


def export(models, args, output_dir: Path, *, changed: set[str], embeddings: list) -> None:
    """A diffusers folder (parts neither trained nor `changed` by a --lora file as they came) and, with
    --save_single_file, the original layout; with --rank, the LoRA files only. The --embedding rows are taken
    out of the text encoder first (it saves as it was read); trained with it (--train_text_encoder), they are
    written to output_dir/embeddings/ in diffusers' layout, one file per --embedding."""
    from diffusion.checkpoints.save import save_diffusers_folder, save_single_file
    words = ""                                        # the --embedding flags a user samples the output with
    if embeddings:
        trained = remove_embeddings(models.text_encoder, embeddings, first=min(models.tokenizer.added_tokens.values()))
        if args.train_text_encoder and args.rank is None:
            words = "".join(f" --embedding {path}" for path in save_embeddings(output_dir / "embeddings", trained))
        else:
            words = "".join(f" --embedding {value}" for value in args.embedding)
    if args.rank is not None:
        parts = ("unet", *text_parts(models)) if args.train_text_encoder else ("unet",)
        written = save_lora_files(models, output_dir, parts=parts, kohya=args.lora_format == "kohya")
        base_loras = "".join(f" --lora {value}" for value in args.lora or [])   # the base it was trained on
        print("LoRA written to " + ", ".join(map(str, written)) + f" (use: python sample.py --ckpt "
              f"{args.pretrained_model_name_or_path}{base_loras} --lora {written[0]}{words})")
        return
    changed = changed | {"unet"} | ({"text_encoder"} if args.train_text_encoder else set())   # differ from the input
    save_diffusers_folder(models, output_dir, trained=changed, config_dir=args.pretrained_config_dir)
    written = [output_dir]
    if args.save_single_file:
        written.append(save_single_file(models, output_dir / f"{output_dir.resolve().name}.safetensors"))
    print("model written to " + ", ".join(map(str, written)) + f" (use: python sample.py --ckpt {output_dir}{words})")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if len(sys.argv) == 1:   # no arguments: the demo on the embedded tiny model (world/dreambooth_demo.py)
            from world.dreambooth_demo import run as demo
            sys.exit(demo())
        sys.exit(main())
