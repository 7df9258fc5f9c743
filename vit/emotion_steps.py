"""The named steps of train_emotion.py's loop, in the order the loop calls them:

    model, preprocess = build_model(...)          a ViT from a preset, or a checkpoint (new head if its labels differ)
    train_set, eval_set = build_datasets(...)     FER2013-style folders or the synthetic faces
    weights = class_weights(train_set, ...)       1 per class, or scikit-learn's "balanced"
    groups = parameter_groups(model, ...)         AdamW's groups: no weight decay on biases and LayerNorm gains
    loader = epoch_batches(train_set, ...)        this process's micro-batches for the rest of one epoch
    loss = weighted_cross_entropy(logits, ...)    the class-weighted cross-entropy of one micro-batch
    grad_norm = optimizer_step(...)               unscale, clip, step, zero (common/training.py)
    training_state / restore_training_state       the whole training state, for exact resume
    r = evaluate(...)                             the held-out report (vit/emotion_eval.py)

The order of an epoch comes from DistributedSampler (seed + epoch) and the augmentation of a sample from
a generator seeded by (seed, epoch, index) (vit/emotion_data.py), so one process and N processes see
the same pixels, and a resumed run sees what the uninterrupted run would have.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from common.hub_cache import resolve_model
from vit.emotion_data import Augment, FaceDataset, balanced_class_weights, load_folder_items, synthetic_items
from vit.model import ViTConfig, ViTForImageClassification
from vit.preprocess import PreprocessConfig
from vit.weights import load_vit

NO_WEIGHT_DECAY = ("cls_token", "pos_embed")   # the [CLS] and position embeddings (timm ViT's no_weight_decay())


def build_model(pretrained: str | None, *, labels: list[str], preset: str,
                image_size: int | None) -> tuple[ViTForImageClassification, PreprocessConfig]:
    """A checkpoint (any layout predict_emotion.py reads; a new head when its labels differ from `labels`),
    or without one a new ViT of `preset` (at `image_size` when given), and its preprocessing."""
    if pretrained:   # a local path, or a repo id read from the Hugging Face cache
        loaded = load_vit(resolve_model(pretrained, flag="--pretrained_model_name_or_path"), labels=labels)
        if loaded.new_head:
            print(f"new {len(labels)}-label head on {loaded.source}", file=sys.stderr)
        return loaded.model, loaded.preprocess
    config = ViTConfig.preset(preset, labels=list(labels), **({"image_size": image_size} if image_size else {}))
    return ViTForImageClassification(config), PreprocessConfig(size=(config.image_size, config.image_size))


def build_datasets(data_dir: str | None, labels: list[str], *, preprocess_config: PreprocessConfig,
                   validation_split: float, num_synthetic_train: int, num_synthetic_eval: int, seed: int,
                   augment: bool) -> tuple[FaceDataset, FaceDataset]:
    """(training set, held-out set): from a FER2013-style folder (its test/ folder, or a stratified
    `validation_split` of it, held out), or without one the built-in synthetic faces. Only the training
    set is augmented. Folder problems raise DataError here, before training starts."""
    if data_dir:
        train_items, eval_items = load_folder_items(data_dir, labels, validation_split=validation_split, seed=seed)
    else:
        train_items, eval_items = synthetic_items(num_synthetic_train, num_synthetic_eval, seed)
    train_set = FaceDataset(train_items, preprocess_config=preprocess_config, seed=seed,
                            augment=Augment() if augment else None)
    return train_set, FaceDataset(eval_items, preprocess_config=preprocess_config)


def class_weights(train_set: FaceDataset, num_labels: int, weighting: str) -> torch.Tensor:
    """(num_labels,) loss weight per class: all 1 ("none"), or scikit-learn's "balanced" weights from
    the training set's class counts, which up-weight rare classes."""
    if weighting == "balanced":
        return balanced_class_weights(train_set.class_counts(num_labels))
    return torch.ones(num_labels)


def parameter_groups(model: torch.nn.Module, *, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """AdamW's parameter groups (Loshchilov & Hutter 2019, decoupled weight decay), as transformers'
    Trainer makes them (`get_decay_parameter_names`): decay on every tensor but the biases and the
    LayerNorm gains, so on the weight matrices, the patch projection, the [CLS] token and the position
    embeddings. With `decay_embeddings` False (--no_weight_decay_embeddings) the [CLS] token and the
    position embeddings are left out too, as timm's VisionTransformer.no_weight_decay() does. Every
    parameter is trained."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        left_out = not decay_embeddings and name in NO_WEIGHT_DECAY
        (decay if p.dim() >= 2 and not left_out else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_batches(train_set: FaceDataset, *, epoch: int, position: int, micro_batches: int, batch_size: int,
                  seed: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """This process's micro-batches of `epoch`, from micro-batch `position` (those a resumed run has
    already done are skipped) to `micro_batches`. DistributedSampler shuffles with seed + epoch and gives
    process `rank` every world_size-th index; the dataset's epoch keys its augmentation."""
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[position * batch_size: micro_batches * batch_size]
    train_set.set_epoch(epoch)
    return DataLoader(train_set, batch_size=batch_size, sampler=order, drop_last=True, num_workers=num_workers)


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Each sample's cross-entropy (in fp32) times its class's weight, averaged over the micro-batch.
    Divided by the sample count, not by the sum of the weights, so micro-batches and processes add up to
    exactly the mean over the global batch."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * class_weights[targets]).mean()


def training_state(model, optimizer, scaler, *, step: int, epoch: int, position: int, rng: dict,
                   run_settings: dict) -> dict:
    """Everything a resumed run needs to continue bit for bit: weights, optimizer, loss scaler, the step
    and data position (`position`: micro-batches of `epoch` already consumed), and the RNG states."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "epoch": epoch, "position": position, "rng": rng,
            "run_settings": run_settings, "model_config": model.config.to_dict()}


def restore_training_state(state: dict, model, optimizer, scaler) -> tuple[int, int, int]:
    """Load `training_state`'s dict back; returns (step, epoch, position) it was saved at."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["step"], state["epoch"], state["position"]
