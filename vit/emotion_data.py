"""Emotion training data: FER2013-style image folders or the built-in synthetic faces, augmentation, and
the per-sample preprocessing that predict_emotion.py uses.

Folder layouts accepted for `--data_dir`:

    data/train/<class>/*.png  +  data/test/<class>/*.png    (FER2013 as usually shipped; "val" or
                                                            "validation" may stand for "test")
    data/<class>/*.png        (split into train/eval by --validation_split, stratified per class)

Class folder names are matched case-insensitively onto the model's labels (dima806's order by default),
so the label index a folder gets is the model's, whatever order the folders are listed in.

Every sample goes through `load_image` (EXIF, any mode -> RGB, so 48x48 grayscale becomes three equal
channels) and `preprocess` (bilinear resize to the model's size, rescale, normalise): exactly the path a
picture takes in predict_emotion.py. Training samples are augmented first as in the dima806 recipe
(random rotation, horizontal flip, sharpness), with a random generator seeded by (seed, epoch, index):
the augmentation of a sample does not depend on which process draws it or on what ran before, which
makes resumed and multi-process runs see exactly the same pixels as a single uninterrupted run.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from common.images import IMAGE_SUFFIXES, ImageError, load_image
from vit.preprocess import PreprocessConfig, preprocess
from vit.synthetic_faces import synthetic_faces

EVAL_FOLDER_NAMES = ("test", "val", "validation")


class DataError(ValueError):
    """A dataset that cannot be trained on. The message names the folder or file."""


@dataclass
class Augment:
    rotation_degrees: float = 15.0   # uniform in [-d, d], about the centre, corners filled with black
    flip_p: float = 0.5              # probability of a horizontal flip (expressions are left-right symmetric)
    sharpness_factor: float = 2.0    # ImageEnhance.Sharpness factor (torchvision's RandomAdjustSharpness)
    sharpness_p: float = 0.5         # probability of applying it

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        angle = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
        if rng.random() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.sharpness_p:
            image = ImageEnhance.Sharpness(image).enhance(self.sharpness_factor)
        return image


class FaceDataset(torch.utils.data.Dataset):
    """(pixel_values (3, H, W), label index) pairs from files or in-memory images, augmented or not."""

    def __init__(self, items: list[tuple[Path | Image.Image, int]], *, preprocess_config: PreprocessConfig,
                 augment: Augment | None = None, seed: int = 0):
        self.items, self.preprocess_config, self.augment, self.seed = items, preprocess_config, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentation differs per epoch; call before building the epoch's DataLoader."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source, label = self.items[index]
        image = load_image(source, name=str(source) if isinstance(source, Path) else f"sample {index}")
        if self.augment is not None:
            image = self.augment(image, np.random.default_rng([self.seed, self.epoch, index]))
        return preprocess([image], self.preprocess_config)[0], label

    def class_counts(self, num_labels: int) -> list[int]:
        counts = [0] * num_labels
        for _, label in self.items:
            counts[label] += 1
        return counts


def balanced_class_weights(counts: list[int]) -> torch.Tensor:
    """n_samples / (n_classes * count_c) per class (scikit-learn's "balanced"): the weights average to 1
    over the training samples, so a weighted loss keeps the unweighted loss's scale. Classes with no
    samples get weight 0."""
    present = [c for c in counts if c > 0]
    total = sum(counts)
    return torch.tensor([total / (len(present) * c) if c else 0.0 for c in counts], dtype=torch.float32)


# ---- folders --------------------------------------------------------------------------------------
def _class_folders(folder: Path, labels: list[str]) -> dict[int, Path]:
    """label index -> class folder, with clear errors for unknown or empty folders."""
    lookup = {label.lower(): i for i, label in enumerate(labels)}
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise DataError(f"{folder}: no class folders (expected one folder per class: {', '.join(labels)})")
    unknown = [p.name for p in subfolders if p.name.lower() not in lookup]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not labels of the model "
                        f"(its labels: {', '.join(labels)})")
    return {lookup[p.name.lower()]: p for p in subfolders}


def scan_folder(folder: Path, labels: list[str]) -> list[tuple[Path, int]]:
    """(path, label) for every readable image under `folder`'s class folders, in a fixed order.

    Every file is opened once now, so a corrupt image is reported (a warning naming it; it is skipped)
    before training starts rather than crashing an epoch. A class folder with no readable image is an
    error.
    """
    items = []
    for index, class_folder in sorted(_class_folders(folder, labels).items()):
        files = sorted(p for p in class_folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        good = []
        for path in files:
            try:
                load_image(path)
            except ImageError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
                continue
            good.append((path, index))
        if not good:
            raise DataError(f"{class_folder}: class folder has no readable images"
                            + (f" ({len(files)} file(s) could not be read)" if files else ""))
        items.extend(good)
    return items


def split_items(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: a seeded `fraction` of each class goes to evaluation (at least one image of
    every class with two or more)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--validation_split {fraction}: must be between 0 and 1")
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    train, held_out = [], []
    for label, group in sorted(by_class.items()):
        group = list(group)
        random.Random(f"{seed}/{label}").shuffle(group)
        n_eval = min(len(group) - 1, max(1, round(fraction * len(group)))) if len(group) > 1 else 0
        held_out.extend(group[:n_eval])
        train.extend(group[n_eval:])
    return train, held_out


def load_folder_items(data_dir: str | Path, labels: list[str], *, validation_split: float,
                      seed: int) -> tuple[list, list]:
    """(train items, eval items) from a FER2013-style folder; see the module docstring for layouts."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir {root}: no such folder")
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "train" in names:
        train = scan_folder(names["train"], labels)
        eval_folder = next((names[n] for n in EVAL_FOLDER_NAMES if n in names), None)
        if eval_folder is not None:
            return train, scan_folder(eval_folder, labels)
        if validation_split > 0:
            return split_items(train, validation_split, seed)
        return train, []
    items = scan_folder(root, labels)
    if validation_split > 0:
        return split_items(items, validation_split, seed)
    return items, []


def synthetic_items(num_train: int, num_eval: int, seed: int) -> tuple[list, list]:
    """The embedded default: `num_train` training and `num_eval` held-out synthetic faces; the two sets
    come from different seeds, so no face is in both."""
    return synthetic_faces(num_train, seed=2 * seed), synthetic_faces(num_eval, seed=2 * seed + 1)
