"""The tiny world: an endless, seeded stream of captioned scenes.

Sample i of World(seed) is a pure function of (seed, split, i): its random draws come from
numpy's generator seeded with the pair [seed, i], so any sample can be drawn again on its own, in
any order, on any machine, and a training run that stops at step s resumes with `batch(s, ...)`
without replaying the first s batches. There are no epochs: every index is a new scene.

Splits: "train" never draws a HELD_OUT colour + shape combination; "held_out" draws only those;
"all" draws every combination.

`TwoColourWorld` is the same stream with a disc of a second colour at each object's centre: pictures
for fine-tuning the VAE decoder only (its captions do not mention the disc and no text-to-image
training reads them). It never draws the DreamBooth subject's own combination (world/subject.py: an
orange star with a blue centre), so the subject stays one the whole world has never shown.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from world.captions import TEMPLATES, caption
from world.scene import COLOURS, HELD_OUT, JITTER, POSITIONS, SHAPES, SIZES, Scene, draw
from world.subject import BODY, CENTRE

CENTRE_RADII = (0.3, 0.6)   # a two-colour object's disc radius, uniform in this range (shape units)

SPLITS = ("train", "held_out", "all")


def combinations(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    every = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if split == "all":
        return every
    held = set(HELD_OUT)
    return [pair for pair in every if (pair in held) == (split == "held_out")]


@dataclass
class Batch:
    images: np.ndarray          # (B, H, W, 3) uint8
    captions: list[str]         # B captions
    attributes: list[dict]      # B dicts: colour, shape, size, position, background


class World:
    def __init__(self, seed: int = 0, *, split: str = "train", image_size: int = 64, supersample: int = 4):
        if image_size < 16:
            raise ValueError(f"image_size={image_size}: the world needs at least 16 pixels a side")
        if supersample < 1:
            raise ValueError(f"supersample={supersample}: must be >= 1")
        self.seed, self.split = seed, split
        self.image_size, self.supersample = image_size, supersample
        self.pairs = combinations(split)

    def scene(self, i: int) -> tuple[Scene, int]:
        """Sample i's scene and the index of its caption template, without drawing it."""
        if i < 0:
            raise ValueError(f"sample index {i}: must be >= 0")
        rng = np.random.default_rng([self.seed, i])
        colour, shape = self.pairs[rng.integers(len(self.pairs))]
        backgrounds = [name for name in COLOURS if name != colour]
        scene = Scene(colour=colour, shape=shape,
                      size=list(SIZES)[rng.integers(len(SIZES))],
                      position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                      background=backgrounds[rng.integers(len(backgrounds))],
                      dx=float(rng.uniform(-JITTER, JITTER)), dy=float(rng.uniform(-JITTER, JITTER)))
        return scene, int(rng.integers(len(TEMPLATES)))

    def sample(self, i: int) -> tuple[Image.Image, str, dict[str, str]]:
        """(image, caption, attributes) of sample i."""
        scene, template = self.scene(i)
        image = draw(scene, image_size=self.image_size, supersample=self.supersample)
        return image, caption(scene, template), scene.attributes()

    def batch(self, step: int, batch_size: int) -> Batch:
        """Samples step * batch_size ... (step + 1) * batch_size - 1, stacked."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        images, captions, attributes = [], [], []
        for i in range(step * batch_size, (step + 1) * batch_size):
            image, text, attrs = self.sample(i)
            images.append(np.asarray(image))
            captions.append(text)
            attributes.append(attrs)
        return Batch(images=np.stack(images), captions=captions, attributes=attributes)  # (B, H, W, 3)

    def batches(self, batch_size: int, *, start_step: int = 0) -> Iterator[Batch]:
        """batch(start_step), batch(start_step + 1), ... forever."""
        step = start_step
        while True:
            yield self.batch(step, batch_size)
            step += 1


class TwoColourWorld(World):
    """World's scenes (same shapes, colours, sizes, places, backgrounds) whose object has a disc of a
    second colour at its centre, neither the object's nor the background's colour, of radius uniform
    in CENTRE_RADII. Sample i's extra draws come from the generator seeded [seed, i, 1], so sample i is
    still a pure function of (seed, split, i). The subject's combination (a BODY star with a CENTRE
    disc) is never drawn: its centre is redrawn among the other colours."""

    def scene(self, i: int) -> tuple[Scene, int]:
        scene, template = super().scene(i)
        rng = np.random.default_rng([self.seed, i, 1])
        centres = [name for name in COLOURS if name not in (scene.colour, scene.background)
                   and (scene.colour, scene.shape, name) != (BODY, "star", CENTRE)]
        return replace(scene, centre=centres[rng.integers(len(centres))],
                       centre_radius=float(rng.uniform(*CENTRE_RADII))), template
