"""The DreamBooth demo's subject: one particular star the world has never shown.

Every object in the world is one flat colour. The subject is an orange star with a blue disc at its
centre: both colours and the star are known words, but never together in one object, so the model
cannot already draw it from a caption. `instance_images()` are its five "photos" (different places,
sizes and backgrounds), the few pictures DreamBooth gets.

How much a sample looks like the subject is measured on colours, since its shape is an ordinary star:
the object's pixels (those whose nearest named colour differs from the background's) are counted per
named colour, and the histogram is compared with the instance images' by histogram intersection,
sum_c min(p_c, q_c) (Swain & Ballard 1991): 1 for the same proportions, 0 for no colour in common.
A single-coloured orange star scores about the subject's orange share; any other star scores ~0.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from world.checker import NAMED_LAB, NAMES, as_array, srgb_to_lab
from world.scene import Scene, draw

BODY, CENTRE = "orange", "blue"    # the star's colour and its centre disc's
CENTRE_RADIUS = 0.42               # of the disc, in shape units (the star's outer radius is 1.15)

# (position, size, background, dx, dy) of each instance image
INSTANCE_SCENES = (
    ("center", "large", "white", 0.0, 0.0),
    ("left", "large", "green", 0.01, -0.02),
    ("top right", "medium", "black", -0.02, 0.01),
    ("bottom", "large", "purple", 0.02, 0.0),
    ("center", "medium", "yellow", -0.01, 0.02),
)


def draw_subject(position: str, size: str, background: str, dx: float = 0.0, dy: float = 0.0, *,
                 image_size: int = 64, supersample: int = 4) -> Image.Image:
    """The subject: a star drawn by world/scene.py with its centre disc (same geometry, same antialiasing)."""
    return draw(Scene(colour=BODY, shape="star", size=size, position=position, background=background, dx=dx, dy=dy,
                      centre=CENTRE, centre_radius=CENTRE_RADIUS), image_size=image_size, supersample=supersample)


def instance_images(image_size: int = 64) -> list[Image.Image]:
    return [draw_subject(*scene, image_size=image_size) for scene in INSTANCE_SCENES]


def object_colours(image) -> np.ndarray:
    """(len(NAMES),) fraction of the object's pixels nearest each named colour (CIELAB). The object is
    every pixel whose nearest name is not the background's (the median of the 2-pixel border)."""
    pixels = as_array(image)                                                      # (H, W, 3) in [0, 1]
    names = np.argmin(np.linalg.norm(srgb_to_lab(pixels)[..., None, :] - NAMED_LAB, axis=-1), axis=-1)  # (H, W)
    border = np.concatenate([names[:2].ravel(), names[-2:].ravel(), names[:, :2].ravel(), names[:, -2:].ravel()])
    background = np.bincount(border, minlength=len(NAMES)).argmax()
    counts = np.bincount(names[names != background], minlength=len(NAMES)).astype(np.float64)
    return counts / max(1.0, counts.sum())


def reference_colours() -> np.ndarray:
    """The mean object-colour histogram of the instance images."""
    return np.mean([object_colours(image) for image in instance_images()], axis=0)


def subject_similarity(image, reference: np.ndarray | None = None) -> float:
    """Histogram intersection of the image's object colours with the subject's, in [0, 1]."""
    reference = reference_colours() if reference is None else reference
    return float(np.minimum(object_colours(image), reference).sum())


def looks_like_subject(image) -> bool:
    """Two-coloured like the subject: at least 30% of the object orange and 10% blue (the instance
    images: about 65% and 30%). A plain star of either colour alone fails one of the two."""
    hist = object_colours(image)
    return bool(hist[NAMES.index(BODY)] >= 0.3 and hist[NAMES.index(CENTRE)] >= 0.1)
