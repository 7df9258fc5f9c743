"""Read a scene back from pixels: the main object's colour, shape, size and position, and the
background colour. Deterministic, numpy only, no learned weights, so it can score a text-to-image
model's samples ("did 'a red star' come out red and star-shaped?") the same way every time.

The steps, for an RGB image with values in [0, 1]:
1. Smooth with a 3 x 3 box filter (noise down 3x; a straight edge's half-way line does not move).
2. Background colour = the median of the border frame (the world keeps shapes off the border).
3. Object colour = the median of the pixels farthest from the background (the flat inside).
4. Coverage alpha = how far each pixel lies from the background towards the object colour (its
   projection on that line, 0 at the background, 1 at the object). Box-filter antialiasing and
   Gaussian blur both mix the two colours linearly, so alpha = 1/2 is the drawn edge; the mask is
   alpha > 1/2, and its largest 4-connected piece is the object.
5. Colour names: the nearest named colour in CIELAB (a roughly perceptual space; CIE 1976 Delta-E).
6. Shape from the radial profile r(theta), the distance from the mask's centroid to the alpha = 1/2
   edge along 64 rays: a shape with k points or corners has a strong k-th Fourier harmonic (triangle
   3, square and cross 4, star 5), a circle none; the square and the cross, both 4, differ in extent
   (area / bounding box area: a square fills its box, a cross leaves the corners empty). Blur rounds
   the points but keeps their number, so the dominant harmonic survives it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from world.scene import COLOURS, GRID_CENTRES, POSITIONS, SIZES, unit_area

BORDER = 2 / 64          # width of the frame that estimates the background (fraction of the side)
CORE = 0.8               # object colour: pixels at least this fraction of the farthest distance from the background
MIN_CONTRAST = 0.15      # object and background colours closer than this (RGB distance, 0..sqrt(3)) -> no object
MIN_AREA = 4 / 64 ** 2   # a mask smaller than this fraction of the image -> no object

# sRGB (D65) -> CIE XYZ, IEC 61966-2-1; XYZ of the D65 white point.
SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> (..., 3) CIELAB (L in 0..100)."""
    rgb = np.clip(rgb, 0.0, 1.0)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)  # undo the sRGB curve
    xyz = linear @ SRGB_TO_XYZ.T / D65_WHITE
    eps, kappa = 216 / 24389, 24389 / 27                                              # CIE's exact constants
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


NAMES = list(COLOURS)
NAMED_LAB = srgb_to_lab(np.array([COLOURS[n] for n in NAMES]) / 255.0)  # (colours, 3)


def nearest_colour(rgb: np.ndarray) -> str:
    """The name of the named colour nearest to one sRGB colour (values in [0, 1]) in CIELAB."""
    return NAMES[int(np.argmin(np.linalg.norm(NAMED_LAB - srgb_to_lab(rgb), axis=-1)))]


@dataclass
class Detection:
    colour: str | None          # None when no object was found
    shape: str | None
    size: str | None
    position: str | None
    background: str
    features: dict[str, float]  # the numbers the decisions were made from


# ---- image helpers --------------------------------------------------------------------------------------
def as_array(image) -> np.ndarray:
    """A PIL image, or an (H, W, 3) uint8 / float array in [0, 1], -> (H, W, 3) float64 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"checker expects an (H, W, 3) image, got shape {array.shape}")
    return array / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)


def box_smooth(x: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter of an (H, W, C) array, edges repeated."""
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of a boolean (H, W) mask (breadth-first flood fill)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


# ---- shape ----------------------------------------------------------------------------------------------
RAY_ANGLES = 64          # directions of the radial profile
RAY_STEP = 0.25          # pixels between samples along a ray


def radial_profile(alpha: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """(RAY_ANGLES,) distance from (cx, cy) to where alpha first falls below 1/2, along evenly spaced
    rays; alpha is read with bilinear interpolation, so the edge is found to a fraction of a pixel."""
    h, w = alpha.shape
    theta = 2 * np.pi * np.arange(RAY_ANGLES) / RAY_ANGLES
    t = np.arange(0.0, max(h, w), RAY_STEP)
    x = np.clip(cx - 0.5 + np.cos(theta)[:, None] * t, 0, w - 1.001)                # (A, S), pixel index units
    y = np.clip(cy - 0.5 + np.sin(theta)[:, None] * t, 0, h - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    a = (alpha[y0, x0] * (1 - fx) * (1 - fy) + alpha[y0, x0 + 1] * fx * (1 - fy)
         + alpha[y0 + 1, x0] * (1 - fx) * fy + alpha[y0 + 1, x0 + 1] * fx * fy)   # (A, S)
    outside = a < 0.5
    outside[:, -1] = True
    return t[np.argmax(outside, axis=1)]                                           # (A,)


def harmonics(profile: np.ndarray, orders: tuple[int, ...]) -> dict[int, float]:
    """|k-th Fourier coefficient| of r(theta) over its mean: a shape with k points (or corners) has a
    large k-th harmonic (star 5, square and cross 4, triangle 3), a circle none."""
    theta = 2 * np.pi * np.arange(len(profile)) / len(profile)
    if profile.sum() == 0:  # the centroid lies outside the mask (a ring, a crescent): no profile
        return {k: 0.0 for k in orders}
    return {k: float(abs(np.sum(profile * np.exp(-1j * k * theta))) / np.sum(profile)) for k in orders}


def shape_features(mask: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
    """Scale-free numbers of a boolean object mask (and the coverage it was cut from)."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    width, height = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
    inside = np.where(mask, alpha, np.minimum(alpha, 0.0))  # other pieces count as background: rays stop at this one's edge
    profile = radial_profile(inside, xs.mean() + 0.5, ys.mean() + 0.5)  # from the centroid (pixel centres at +0.5)
    return {
        **{f"h{k}": v for k, v in harmonics(profile, (3, 4, 5)).items()},
        "mean_radius": float(profile.mean()),  # 0 when the centroid lies outside the mask
        "extent": area / (width * height),
        "width": width, "height": height, "area": area,
        "x": float(xs.min() + xs.max() + 1) / 2, "y": float(ys.min() + ys.max() + 1) / 2,  # box centre
    }


# Decision thresholds, set between the classes they separate as measured on world images, clean and
# blurred by up to 1.5 px (python -m world.evaluate prints each shape's feature ranges):
POINTED = 0.025      # largest of h3, h4, h5: circle <= 0.02, every other shape >= 0.03
SQUARE_EXTENT = 0.72  # square 0.77..1.0 (a box filled), cross 0.50..0.66 (its corners empty)
POINTS = {3: "triangle", 5: "star"}  # the dominant harmonic names the shape (4: square or cross)


def classify_shape(features: dict[str, float]) -> str | None:
    if features["mean_radius"] == 0:  # a ring or a crescent: none of the world's shapes
        return None
    order = max((3, 4, 5), key=lambda k: features[f"h{k}"])
    if features[f"h{order}"] < POINTED:
        return "circle"
    if order in POINTS:
        return POINTS[order]
    return "square" if features["extent"] > SQUARE_EXTENT else "cross"


def grid_position(x: float, y: float, image_size: int) -> str:
    """The POSITIONS name of the grid cell nearest to the box centre (x, y) in pixels."""
    column = int(np.argmin([abs(x / image_size - c) for c in GRID_CENTRES]))
    row = int(np.argmin([abs(y / image_size - c) for c in GRID_CENTRES]))
    return next(name for name, cell in POSITIONS.items() if cell == (column, row))


def size_name(shape: str, area: float, image_size: int) -> str:
    """The SIZES name whose radius is nearest (in ratio) to the one the mask's area implies for `shape`
    (area, not the bounding box: blur shortens a star's thin points much more than it shrinks its area)."""
    radius = np.sqrt(area / unit_area(shape)) / image_size
    return min(SIZES, key=lambda name: abs(np.log(radius / SIZES[name])))


# ---- the checker ----------------------------------------------------------------------------------------
def check(image) -> Detection:
    """Detect the main object of one image (PIL, or an (H, W, 3) array: uint8, or float in [0, 1])."""
    pixels = box_smooth(as_array(image))                                       # (H, W, 3)
    h, w = pixels.shape[:2]
    frame = max(1, round(BORDER * min(h, w)))
    border = np.concatenate([pixels[:frame].reshape(-1, 3), pixels[-frame:].reshape(-1, 3),
                             pixels[:, :frame].reshape(-1, 3), pixels[:, -frame:].reshape(-1, 3)])
    background = np.median(border, axis=0)                                     # (3,)
    distance = np.linalg.norm(pixels - background, axis=-1)                    # (H, W)
    features: dict[str, float] = {"contrast": float(distance.max())}
    nothing = Detection(None, None, None, None, nearest_colour(background), features)
    if distance.max() < MIN_CONTRAST:
        return nothing
    colour = np.median(pixels[distance >= CORE * distance.max()], axis=0)     # (3,)
    axis = colour - background
    alpha = (pixels - background) @ axis / float(axis @ axis)                  # (H, W), 0 bg .. 1 object
    mask = largest_component(alpha > 0.5)
    if mask.sum() < MIN_AREA * h * w:
        return nothing
    features.update(shape_features(mask, alpha))
    shape = classify_shape(features)
    return Detection(colour=nearest_colour(colour), shape=shape,
                     size=size_name(shape, features["area"], min(h, w)) if shape else None,
                     position=grid_position(features["x"], features["y"], min(h, w)),
                     background=nearest_colour(background), features=features)
