"""Train (or fine-tune, or evaluate) the ViT emotion classifier. The whole loop is in `main`, top to bottom.

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
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common.run_config import check_resume_config, finish_run_record, parse_args_with_config, start_run_record
from common.state_dict import CheckpointError
from common.precision import MIXED_PRECISION, autocast
from common.training import (LR_SCHEDULERS, REPORT_TO, MetricsLog, StopOnSignal, all_reduce_sum, barrier,
                             grad_scaler, gradient_sync, learning_rate, load_checkpoint, optimizer_step,
                             resolve_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state,
                             setup_distributed, stop_requested, teardown_distributed)
from vit.emotion_data import (Augment, DataError, FaceDataset, balanced_class_weights, load_folder_items,
                              synthetic_items)
from vit.emotion_eval import evaluate, write_report
from vit.model import EMOTION_LABELS, ViTConfig, ViTForImageClassification
from vit.preprocess import PreprocessConfig
from vit.weights import load_vit, save_pretrained

# The settings that shape a run: resuming with any of them changed needs --allow_config_change.
RUN_SHAPING = ("data_dir", "pretrained_model_name_or_path", "preset", "image_size", "num_synthetic_train",
               "validation_split", "train_batch_size", "gradient_accumulation_steps", "world_size",
               "learning_rate", "lr_scheduler", "lr_warmup_steps", "num_train_epochs", "max_train_steps",
               "weight_decay", "max_grad_norm", "seed", "mixed_precision", "class_weighting", "augmentation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_emotion.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", help="a TOML file of flag = value lines; flags on the command line override it")
    a("--data_dir", help="FER2013-style folder (train/ and test/ class folders, or class folders + "
                         "--validation_split); without it, the built-in synthetic faces")
    a("--pretrained_model_name_or_path", help="a local ViT checkpoint (any layout predict_emotion.py reads); "
                                              "a new head when its labels differ")
    a("--preset", default="small", choices=list(ViTConfig.PRESETS), help="architecture when training from scratch")
    a("--image_size", type=int, help="input side for a model trained from scratch (default: the preset's)")
    a("--output_dir", default="runs/emotion", help="model, checkpoints, metrics and run record go here")
    a("--num_train_epochs", type=int, default=10, help="epochs, unless --max_train_steps is set")
    a("--max_train_steps", type=int, help="optimizer steps in all (overrides --num_train_epochs)")
    a("--train_batch_size", type=int, default=32, help="images per process per micro-batch")
    a("--eval_batch_size", type=int, default=128, help="images per process per evaluation batch")
    a("--learning_rate", type=float, default=5e-4, help="peak learning rate of AdamW (the small ViT stalls at 1e-3)")
    a("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="learning-rate schedule (diffusers' and transformers' get_scheduler)")
    a("--lr_warmup_steps", type=int, default=100, help="steps of linear warmup from 0 to --learning_rate")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)")
    a("--weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay on weight matrices")
    a("--mixed_precision", default="no", choices=list(MIXED_PRECISION), help="autocast dtype for the forward pass")
    a("--report_to", default="jsonl", choices=REPORT_TO,
      help="metrics.jsonl is always written; 'tensorboard' adds event files (needs the tensorboard package)")
    a("--checkpointing_steps", type=int, default=500, help="save the full training state every N steps")
    a("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", help="a checkpoint file, or 'latest' in --output_dir")
    a("--allow_config_change", action="store_true", help="resume even when run-shaping settings changed")
    a("--seed", type=int, default=0, help="model init, data order, augmentation and synthetic faces")
    a("--class_weighting", default="none", choices=["none", "balanced"], help="'balanced' up-weights rare classes")
    a("--validation_split", type=float, default=0.1, help="share of each class held out when there is no test/")
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


def build_model(args, labels: list[str]) -> tuple[ViTForImageClassification, PreprocessConfig]:
    if args.pretrained_model_name_or_path:
        loaded = load_vit(args.pretrained_model_name_or_path, labels=labels)
        if loaded.new_head:
            print(f"new {len(labels)}-label head on {loaded.source}", file=sys.stderr)
        return loaded.model, loaded.preprocess
    config = ViTConfig.preset(args.preset, labels=list(labels),
                              **({"image_size": args.image_size} if args.image_size else {}))
    return ViTForImageClassification(config), PreprocessConfig(size=(config.image_size, config.image_size))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_args(args, parser)
    try:
        dist = setup_distributed(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    labels = list(EMOTION_LABELS)
    seed_everything(args.seed)

    # ---- model and data (every data problem is reported here, before training starts) --------------
    try:
        if args.eval_only and not args.pretrained_model_name_or_path:
            args.pretrained_model_name_or_path = str(output_dir)
        model, preprocess_config = build_model(args, labels)
        if args.data_dir:
            train_items, eval_items = load_folder_items(args.data_dir, labels, validation_split=args.validation_split,
                                                        seed=args.seed)
        else:
            train_items, eval_items = synthetic_items(args.num_synthetic_train, args.num_synthetic_eval, args.seed)
        if not train_items and not args.eval_only:
            raise DataError(f"--data_dir {args.data_dir}: no training images")
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        teardown_distributed(dist)
        return 2
    model.to(dist.device)
    eval_set = FaceDataset(eval_items, preprocess_config=preprocess_config)
    if args.eval_only:
        if not eval_items:
            print("error: no held-out images (give test/ or --validation_split)", file=sys.stderr)
            teardown_distributed(dist)
            return 2
        r = evaluate(model, eval_set, batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers,
                     precision=MIXED_PRECISION[args.mixed_precision], dist=dist)
        if dist.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_report(r, output_dir)
        teardown_distributed(dist)
        return 0

    train_set = FaceDataset(train_items, preprocess_config=preprocess_config, seed=args.seed,
                            augment=Augment() if args.augmentation == "on" else None)
    counts = train_set.class_counts(len(labels))
    class_weights = (balanced_class_weights(counts) if args.class_weighting == "balanced"
                     else torch.ones(len(labels))).to(dist.device)
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * dist.world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        print(f"error: {len(train_set)} training images are fewer than one global batch of {global_batch} "
              "(--train_batch_size x --gradient_accumulation_steps x processes)", file=sys.stderr)
        teardown_distributed(dist)
        return 2
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch

    # AdamW (Loshchilov & Hutter 2019) with weight decay on weight matrices only, not on biases,
    # LayerNorm gains or the [CLS]/position embeddings.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("cls_token", "pos_embed"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate)
    scaler = grad_scaler(dist.device, MIXED_PRECISION[args.mixed_precision])

    # ---- resume: model, optimizer, scaler, step, data position and every RNG state -----------------
    run_settings = {**vars(args), "world_size": dist.world_size}
    step, epoch, position = 0, 0, 0       # position: micro-batches of `epoch` already consumed
    try:
        resume_path = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        teardown_distributed(dist)
        return 2
    if args.resume_from_checkpoint and resume_path is None:
        print(f"no checkpoint in {output_dir}; starting from scratch", file=sys.stderr)
    if ckpt is not None:
        try:
            for line in check_resume_config(ckpt["run_settings"], run_settings, RUN_SHAPING,
                                            checkpoint=resume_path, allow_change=args.allow_config_change):
                print(f"warning: changed since the checkpoint:{line}", file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            teardown_distributed(dist)
            return 2
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        set_rng_state(ckpt["rng"])
        print(f"resumed from {resume_path} at step {step}", file=sys.stderr)

    ddp_model = DDP(model) if dist.enabled else model   # averages gradients over processes in backward
    log = MetricsLog(output_dir, enabled=dist.is_main, report_to=args.report_to)
    info = (start_run_record(output_dir, args, parser, device=str(dist.device), world_size=dist.world_size,
                             dtype=MIXED_PRECISION[args.mixed_precision], argv=argv)
            if dist.is_main else None)

    def checkpoint() -> None:
        # The RNG states saved are the main process's: every process seeds the same way, and the data
        # randomness (order, augmentation) is keyed by (seed, epoch, index), not drawn from them.
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "epoch": epoch, "position": position, "rng": rng_state(),
                 "run_settings": run_settings, "model_config": model.config.to_dict()}
        if dist.is_main:
            save_checkpoint(output_dir, step, state, total_limit=args.checkpoints_total_limit)
        barrier(dist)

    # ---- the loop -------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    micro_per_epoch = steps_per_epoch * args.gradient_accumulation_steps
    stopped_by = None
    with StopOnSignal() as stop:
        while step < max_steps and stopped_by is None:
            # The epoch's order: DistributedSampler shuffles with seed + epoch and gives this process
            # every world_size-th index; we skip the micro-batches a resumed run has already done.
            sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                         shuffle=True, seed=args.seed, drop_last=True)
            sampler.set_epoch(epoch)
            order = list(sampler)[position * args.train_batch_size: micro_per_epoch * args.train_batch_size]
            train_set.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=args.train_batch_size, sampler=order, drop_last=True,
                                num_workers=args.dataloader_num_workers)
            t0, loss_sum = time.perf_counter(), torch.zeros((), device=dist.device)
            for pixels, targets in loader:
                pixels, targets = pixels.to(dist.device), targets.to(dist.device)
                position += 1
                last_micro = position % args.gradient_accumulation_steps == 0
                # Gradients are all-reduced over processes on the last micro-batch of an accumulation only.
                with gradient_sync([ddp_model], sync=last_micro):
                    with autocast(MIXED_PRECISION[args.mixed_precision], dist.device):
                        logits = ddp_model(pixels)                                   # (B, num_labels)
                    # Per-sample cross-entropy in fp32, weighted per class, averaged over the micro-batch
                    # (divided by the sample count, not the weight sum, so micro-batches and processes
                    # add up to exactly the mean over the global batch) and over the accumulation.
                    per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
                    loss = (per_sample * class_weights[targets]).mean() / args.gradient_accumulation_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                if not last_micro:
                    continue

                lr = learning_rate(step, total=max_steps, peak=args.learning_rate, schedule=args.lr_scheduler,
                                   warmup=args.lr_warmup_steps)
                grad_norm = optimizer_step(optimizer, scaler, list(model.parameters()), lr=lr,
                                           max_grad_norm=args.max_grad_norm)
                step += 1

                loss_value = all_reduce_sum(loss_sum, dist).item() / dist.world_size
                elapsed = time.perf_counter() - t0
                log.log({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                         "grad_norm": grad_norm.item(), "samples_per_s": global_batch / elapsed})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                t0, loss_sum = time.perf_counter(), torch.zeros((), device=dist.device)

                if position == micro_per_epoch:             # the epoch is done: the next one starts at 0
                    epoch, position = epoch + 1, 0
                if stop_requested(stop, dist):
                    stopped_by = stop.signum or 15
                if step % args.checkpointing_steps == 0 or (stopped_by and step < max_steps):
                    checkpoint()
                if step >= max_steps or stopped_by:
                    break
            else:
                if position != 0:   # the loader ran dry mid-accumulation: not expected with drop_last
                    raise RuntimeError(f"epoch {epoch} ended at micro-batch {position}")
    bar.close()

    if stopped_by and step < max_steps:
        print(f"stopped by signal {stopped_by} at step {step}; resume with --resume_from_checkpoint latest",
              file=sys.stderr)
        if dist.is_main:
            finish_run_record(output_dir, info, status=f"stopped by signal {stopped_by}", step=step)
        log.close()
        teardown_distributed(dist)
        return 128 + stopped_by

    # ---- evaluate and export --------------------------------------------------------------------------
    r = (evaluate(model, eval_set, batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers,
                  precision=MIXED_PRECISION[args.mixed_precision], dist=dist) if eval_items else None)
    if dist.is_main:
        save_pretrained(model, preprocess_config, output_dir)
        if r is not None:
            write_report(r, output_dir)
            log.log({"step": step, "eval_accuracy": r["accuracy"], "eval_macro_f1": r["macro_f1"]})
        finish_run_record(output_dir, info, step=step,
                          eval_accuracy=r["accuracy"] if r else None)
        print(f"model written to {output_dir} (use: python predict_emotion.py --model {output_dir} IMAGES)")
    log.close()
    teardown_distributed(dist)
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        sys.exit(main())
