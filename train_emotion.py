"""Train (or fine-tune, or evaluate) the ViT emotion classifier. The loop is in `main`, top to bottom, as
named steps (vit/emotion_steps.py).

    python train_emotion.py                       # small ViT on built-in synthetic faces, CPU, a few minutes
    python train_emotion.py --data_dir fer2013 --pretrained_model_name_or_path google-vit-in21k/ \\
        --preset b16 --mixed_precision bf16       # FER2013 folders, fine-tuning a public backbone
    torchrun --nproc_per_node 2 train_emotion.py  # data parallel: gloo on CPU, NCCL on CUDA
    python train_emotion.py --config configs/train_emotion.example.toml --learning_rate 1e-4

The output folder holds the model in transformers' layout (config.json, model.safetensors,
preprocessor_config.json: predict_emotion.py --model reads it, and so does transformers), checkpoints
`checkpoint-<step>.pt`, `metrics.jsonl`, the evaluation report and confusion matrix, `run_config.toml`
and `run_info.json`.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common.files import check_writable
from common.precision import MIXED_PRECISION, autocast
from common.run_config import finish_run_record, finite_float, parse_args_with_config, start_run_record
from common.state_dict import CheckpointError
from common.training import (LR_SCHEDULERS, REPORT_TO, Checkpoints, Distributed, MetricsLog, NonFiniteLoss,
                             StopOnSignal, adamw, check_output_dir, count_steps, fail, fail_run, finish_step,
                             grad_scaler, gradient_sync, learning_rate, report_stale_temporaries, resume, rng_state,
                             save_training_state, seed_everything, setup_distributed, stop_requested, stopped_run,
                             teardown_distributed)
from vit.emotion_data import DataError
from vit.emotion_eval import evaluate, write_report
from vit.emotion_steps import (build_datasets, build_model, class_weights, epoch_batches, parameter_groups,
                               restore_training_state, training_state, weighted_cross_entropy)
from vit.model import EMOTION_LABELS, ViTConfig
from vit.weights import save_pretrained

# The settings that shape a run: resuming with any of them changed needs --allow_config_change.
RUN_SHAPING = ("data_dir", "pretrained_model_name_or_path", "preset", "image_size", "num_synthetic_train",
               "validation_split", "train_batch_size", "gradient_accumulation_steps", "world_size",
               "learning_rate", "lr_scheduler", "lr_warmup_steps", "num_train_epochs", "max_train_steps",
               "weight_decay", "no_weight_decay_embeddings", "max_grad_norm", "seed", "mixed_precision",
               "class_weighting", "augmentation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_emotion.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="a TOML file of flag = value lines; flags on the command line override it")
    a("--data_dir", help="FER2013-style folder (train/ and test/ class folders, or class folders + "
                         "--validation_split); without it, the built-in synthetic faces")
    a("--pretrained_model_name_or_path", help="a ViT checkpoint (any layout predict_emotion.py reads, or a repo id "
                                              "of the Hugging Face cache, org/name[@revision]); a new head when its "
                                              "labels differ")
    a("--preset", default="small", choices=list(ViTConfig.PRESETS), help="architecture when training from scratch")
    a("--image_size", type=int, help="input side for a model trained from scratch (default: the preset's)")
    a("--output_dir", default="runs/emotion", help="model, checkpoints, metrics and run record go here")
    a("--num_train_epochs", type=int, default=10, help="epochs, unless --max_train_steps is set")
    a("--max_train_steps", type=int, help="optimizer steps in all (overrides --num_train_epochs)")
    a("--train_batch_size", type=int, default=32, help="images per process per micro-batch")
    a("--eval_batch_size", type=int, default=128, help="images per process per evaluation batch")
    a("--learning_rate", type=finite_float, default=5e-4,
      help="peak learning rate of AdamW (the small ViT stalls at 1e-3)")
    a("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS,
      help="learning-rate schedule (diffusers' and transformers' get_scheduler)")
    a("--lr_warmup_steps", type=int, default=100, help="steps of linear warmup from 0 to --learning_rate")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--max_grad_norm", type=finite_float, default=1.0, help="clip the global gradient norm to this (0: no clipping)")
    a("--weight_decay", type=finite_float, default=0.05,
      help="AdamW decoupled weight decay, on all but biases and LayerNorm gains (as transformers' Trainer)")
    a("--no_weight_decay_embeddings", action="store_true",
      help="leave the [CLS] token and position embeddings out of weight decay too, as timm's ViT")
    a("--mixed_precision", default="no", choices=list(MIXED_PRECISION), help="autocast dtype for the forward pass")
    a("--report_to", default="jsonl", choices=REPORT_TO,
      help="metrics.jsonl is always written; 'tensorboard' adds event files (needs the tensorboard package)")
    a("--checkpointing_steps", type=int, default=500, help="save the full training state every N steps")
    a("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints (of this run)")
    a("--overwrite_output_dir", action="store_true",
      help="write into an --output_dir that holds another run's state (its checkpoints are never pruned)")
    a("--skip_nonfinite_steps", action="store_true",
      help="skip an optimizer step whose loss is NaN/inf (counted in metrics.jsonl) instead of stopping the run")
    a("--resume_from_checkpoint", help="a checkpoint file, or 'latest' in --output_dir")
    a("--allow_config_change", action="store_true", help="resume even when run-shaping settings changed")
    a("--seed", type=int, default=0, help="model init, data order, augmentation and synthetic faces")
    a("--class_weighting", default="none", choices=["none", "balanced"], help="'balanced' up-weights rare classes")
    a("--validation_split", type=finite_float, default=0.1, help="share of each class held out when there is no test/")
    a("--augmentation", default="on", choices=["on", "off"], help="random rotation, flip and sharpness")
    a("--num_synthetic_train", type=int, default=7000, help="synthetic training faces (no --data_dir)")
    a("--num_synthetic_eval", type=int, default=700, help="synthetic held-out faces (no --data_dir)")
    a("--dataloader_num_workers", type=int, default=0, help="worker processes loading images")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--eval_only", action="store_true", help="evaluate --pretrained_model_name_or_path (or the model in "
                                               "--output_dir) on the held-out set and stop")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        MetricsLog.check(args.report_to)
    except ValueError as e:
        parser.error(str(e))
    for name in ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_train_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("max_train_steps", "checkpoints_total_limit", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.learning_rate <= 0 or args.lr_warmup_steps < 0 or args.weight_decay < 0 or args.max_grad_norm < 0:
        parser.error("--learning_rate must be > 0; --lr_warmup_steps, --weight_decay, --max_grad_norm >= 0")
    if not 0.0 <= args.validation_split < 1.0:
        parser.error(f"--validation_split {args.validation_split}: must be in [0, 1)")
    try:
        check_sizes(args)
    except ValueError as e:
        parser.error(str(e))


def check_sizes(args: argparse.Namespace) -> None:
    """The seed, the counts and the sizes against the model and the machine's memory, before any work."""
    import os

    from common.flags import SEED_MAX, UsageError, check_seed
    from common.memory import check_memory, training_device
    from vit.memory import TRAINED_PARAMETER_BYTES, batch_bytes, parameter_count
    from vit.synthetic_faces import OUTPUT_SIZE
    check_seed(args.seed, low=0, high=SEED_MAX // 2)
    if not args.data_dir and args.num_synthetic_train < 1 and not args.eval_only:
        raise UsageError(f"--num_synthetic_train {args.num_synthetic_train}: must be at least 1 without --data_dir")
    if args.num_synthetic_eval < 0:
        raise UsageError(f"--num_synthetic_eval {args.num_synthetic_eval}: must be >= 0")
    cpus = os.cpu_count() or 1
    if not 0 <= args.dataloader_num_workers <= 4 * cpus:
        raise UsageError(f"--dataloader_num_workers {args.dataloader_num_workers}: must be from 0 to {4 * cpus} "
                         f"(4 per CPU here; each worker is a process)")
    if args.pretrained_model_name_or_path:   # its own size, read with the model (and checked then)
        config = None
    else:
        config = ViTConfig.preset(args.preset, **({"image_size": args.image_size} if args.image_size else {}))
        if config.image_size % config.patch_size:
            raise UsageError(f"--image_size {config.image_size}: must be a multiple of the patch size "
                             f"{config.patch_size} (--preset {args.preset})")
    faces = 0 if args.data_dir else (args.num_synthetic_train + args.num_synthetic_eval) * (3 * OUTPUT_SIZE ** 2 + 1024)
    check_memory(faces, device="cpu", what=f"--num_synthetic_train {args.num_synthetic_train} and "
                 f"--num_synthetic_eval {args.num_synthetic_eval} faces held in memory",
                 advice="lower them (or train on a --data_dir, read image by image)")
    if config is not None:   # on a GPU the faces stay in RAM
        device = training_device(args.device)
        held = faces if device.type == "cpu" else 0
        train_batch, eval_batch = args.train_batch_size, args.eval_batch_size
        if not args.data_dir:   # a batch holds no more images than the set
            train_batch = min(train_batch, args.num_synthetic_train)
            eval_batch = min(eval_batch, args.num_synthetic_eval)
        weights = TRAINED_PARAMETER_BYTES * parameter_count(config)
        step = batch_bytes(config, train_batch, training=True)
        check_memory(held + weights + step, device=device, what=f"a training step of --train_batch_size "
                     f"{args.train_batch_size} at --image_size {config.image_size}",
                     advice="lower --train_batch_size (--gradient_accumulation_steps keeps the batch) or --image_size")
        check_memory(held + weights + batch_bytes(config, eval_batch, training=False), device=device,
                     what=f"an evaluation batch of --eval_batch_size {args.eval_batch_size} at --image_size "
                     f"{config.image_size}", advice="lower --eval_batch_size")


def model_and_data(args: argparse.Namespace, dist: Distributed):
    """The model on the device (a checkpoint, or a new ViT of --preset) and the training and held-out
    sets; every data problem is reported here, before training starts (a DataError or ValueError)."""
    labels = list(EMOTION_LABELS)
    model, preprocess_config = build_model(args.pretrained_model_name_or_path, labels=labels, preset=args.preset,
                                           image_size=args.image_size)
    train_set, eval_set = build_datasets(args.data_dir, labels, preprocess_config=preprocess_config,
                                         validation_split=args.validation_split,
                                         num_synthetic_train=args.num_synthetic_train,
                                         num_synthetic_eval=args.num_synthetic_eval, seed=args.seed,
                                         augment=args.augmentation == "on")
    if len(train_set) == 0 and not args.eval_only:
        raise DataError(f"--data_dir {args.data_dir}: no training images")
    if len(eval_set) == 0 and args.eval_only:
        raise DataError("no held-out images (give test/ or --validation_split)")
    return model.to(dist.device), preprocess_config, train_set, eval_set


def evaluate_and_export(model, preprocess_config, eval_set, args: argparse.Namespace, dist: Distributed, *,
                        log: MetricsLog | None = None, info: dict | None = None, step: int | None = None) -> None:
    """The held-out report (evaluation.json, the confusion matrix) into --output_dir; after training
    (`step` given) also the model, its metrics line and the finished run record."""
    output_dir = Path(args.output_dir)
    r = (evaluate(model, eval_set, batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers,
                  precision=MIXED_PRECISION[args.mixed_precision], dist=dist) if len(eval_set) else None)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if step is not None:
            save_pretrained(model, preprocess_config, output_dir)
        if r is not None:
            write_report(r, output_dir)
        if step is not None:
            if r is not None:
                log.log({"step": step, "eval_accuracy": r["accuracy"], "eval_macro_f1": r["macro_f1"]})
            finish_run_record(output_dir, info, step=step, eval_accuracy=r["accuracy"] if r else None)
            print(f"model written to {output_dir} (use: python predict_emotion.py --model {output_dir} IMAGES)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args, parser)
    output_dir, precision = Path(args.output_dir), MIXED_PRECISION[args.mixed_precision]   # "fp32", "bf16", "fp16"
    if args.eval_only and not args.pretrained_model_name_or_path:
        args.pretrained_model_name_or_path = str(output_dir)
    try:
        if not args.eval_only:
            check_output_dir(output_dir, resuming=bool(args.resume_from_checkpoint),
                             overwrite=args.overwrite_output_dir)
        dist = setup_distributed(args.device)
        if not args.eval_only:
            check_writable(output_dir, "--output_dir")
    except ValueError as e:
        return fail(str(e))
    report_stale_temporaries(dist, output_dir)
    seed_everything(args.seed)
    try:
        model, preprocess_config, train_set, eval_set = model_and_data(args, dist)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        return fail(str(e), dist)
    if args.eval_only:
        evaluate_and_export(model, preprocess_config, eval_set, args, dist)
        teardown_distributed(dist)
        return 0

    # ---- the loss's class weights, the optimizer, the schedule of steps, resume ----------------------------
    loss_weights = class_weights(train_set, len(EMOTION_LABELS), args.class_weighting).to(dist.device)  # (labels,)
    accumulation = args.gradient_accumulation_steps
    global_batch = args.train_batch_size * accumulation * dist.world_size
    optimizer = adamw(parameter_groups(model, weight_decay=args.weight_decay,
                                       decay_embeddings=not args.no_weight_decay_embeddings), lr=args.learning_rate)
    scaler = grad_scaler(dist.device, precision)
    run_settings = {**vars(args), "world_size": dist.world_size}
    checkpoints = Checkpoints(output_dir, total_limit=args.checkpoints_total_limit)
    try:   # too few images for one global batch; resume: model, optimizer, scaler, step, data position, RNG
        steps_per_epoch, max_steps = count_steps(len(train_set), global_batch=global_batch, what="training images",
                                                 max_train_steps=args.max_train_steps,
                                                 num_train_epochs=args.num_train_epochs)
        (step, epoch, position), skipped = resume(   # position: micro-batches of `epoch` already consumed
            checkpoints, args.resume_from_checkpoint, run_settings=run_settings, run_shaping=RUN_SHAPING,
            allow_change=args.allow_config_change,
            restore=partial(restore_training_state, model=model, optimizer=optimizer, scaler=scaler)) or ((0, 0, 0), 0)
    except ValueError as e:
        return fail(str(e), dist)
    micro_per_epoch = steps_per_epoch * accumulation

    ddp_model = DDP(model) if dist.enabled else model   # averages gradients over processes in backward
    log = MetricsLog(output_dir, enabled=dist.is_main, report_to=args.report_to, start_step=step)
    info = (start_run_record(output_dir, args, parser, device=str(dist.device), world_size=dist.world_size,
                             dtype=precision, argv=argv) if dist.is_main else None)
    ending = dict(dist=dist, log=log, output_dir=output_dir, info=info)     # what fail_run and stopped_run record

    # ---- the loop -------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    stopped_by = None
    with StopOnSignal() as stop:
        while step < max_steps and stopped_by is None:
            loader = epoch_batches(train_set, epoch=epoch, position=position, micro_batches=micro_per_epoch,
                                   batch_size=args.train_batch_size, seed=args.seed, rank=dist.rank,
                                   world_size=dist.world_size, num_workers=args.dataloader_num_workers)
            t0, loss_sum = time.perf_counter(), torch.zeros(1, device=dist.device)
            for pixels, targets in loader:
                pixels, targets = pixels.to(dist.device), targets.to(dist.device)   # (B, 3, H, W), (B,)
                position += 1
                last_micro = position % accumulation == 0
                # Gradients are all-reduced over processes on the last micro-batch of an accumulation only.
                with gradient_sync([ddp_model], sync=last_micro):
                    with autocast(precision, dist.device):
                        logits = ddp_model(pixels)                                   # (B, num_labels)
                    loss = weighted_cross_entropy(logits, targets, loss_weights)    # this micro-batch's mean
                    scaler.scale(loss / accumulation).backward()                   # the global batch's mean
                loss_sum += loss.detach()
                if not last_micro:
                    continue

                lr = learning_rate(step, total=max_steps, peak=args.learning_rate, schedule=args.lr_scheduler,
                                   warmup=args.lr_warmup_steps)
                try:
                    record = finish_step(loss_sum, names=("loss",), micro_batches=accumulation, step=step,
                                         skipped=skipped, lr=lr, dist=dist, optimizer=optimizer, scaler=scaler,
                                         params=list(model.parameters()), max_grad_norm=args.max_grad_norm,
                                         skip_nonfinite=args.skip_nonfinite_steps)
                except NonFiniteLoss as e:
                    return fail_run(str(e), reason="non-finite loss", **ending, step=step)
                step, skipped = record["step"], record["skipped_nonfinite_steps"]
                log.log({**record, "epoch": epoch, "samples_per_s": global_batch / (time.perf_counter() - t0)})
                bar.update(1)
                bar.set_postfix(loss=record["loss"], lr=f"{lr:.2e}")
                t0, loss_sum = time.perf_counter(), torch.zeros(1, device=dist.device)

                if position == micro_per_epoch:             # the epoch is done: the next one starts at 0
                    epoch, position = epoch + 1, 0
                if stop_requested(stop, dist):
                    stopped_by = stop.signum or 15
                if step % args.checkpointing_steps == 0 or (stopped_by and step < max_steps):
                    state = training_state(model, optimizer, scaler, step=step, epoch=epoch, position=position,
                                           rng=rng_state(), run_settings=run_settings)
                    error = save_training_state(dist, checkpoints, step, {**state, "skipped_nonfinite_steps": skipped})
                    if error is not None:   # a full disk, say: the previous checkpoint is intact
                        return fail_run(error, reason=error, **ending, step=step)
                if step >= max_steps or stopped_by:
                    break
            else:
                if position != 0:   # the loader ran dry mid-accumulation: not expected with drop_last
                    raise RuntimeError(f"epoch {epoch} ended at micro-batch {position}")
    bar.close()

    if stopped_by and step < max_steps:
        return stopped_run(stopped_by, **ending, step=step)
    evaluate_and_export(model, preprocess_config, eval_set, args, dist, log=log, info=info, step=step)
    log.close()
    teardown_distributed(dist)
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        sys.exit(main())
