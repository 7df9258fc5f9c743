"""Multi-scale face detection: `detect_faces(image) -> [(x, y, w, h), ...]`.

This is OpenCV's `CascadeClassifier.detectMultiScale` (objdetect/src/cascadedetect.cpp, 4.x),
step by step, so both give the same boxes:

1. scales: factor = 1, s, s^2, ... (s = scale_factor); the window at that factor is
   round(24 * factor); factors whose window is under `min_size` are skipped, and the list stops
   at the first window over `max_size` or over the image. Each factor is kept as float32.
2. for each factor, the image is shrunk to round(W / factor) x round(H / factor) with OpenCV's
   bilinear INTER_LINEAR_EXACT resize (faces/resize.py), and the cascade's window (24x24 for
   faces) slides over it with step 2 while factor < 2 and step 1 from factor 2 on
   (`ystep = sc >= 2 ? 1 : 2`);
   OpenCV splits the rows into stripes for its threads, which can leave out the last row or two;
   we take the same rows.
3. a window at (x, y) that passes every stage becomes the box (round(x * f), round(y * f),
   round(24 * f), round(24 * f)) in the original image (faces/scan.py and faces/evaluate.py
   decide which windows pass);
4. the boxes are grouped with eps 0.2 and `min_neighbors` (faces/group.py) and clipped to the image.

`max_side` is ours, not OpenCV's: the work grows with the pixel count, so a 24-megapixel photo takes
many seconds. With max_side set, a larger image is shrunk (area averaging, as OpenCV's INTER_AREA)
until its longer side is max_side, the detector runs on that copy, and the boxes are scaled back to
the image's own pixels. min_size and max_size keep meaning pixels of the image, but no face smaller
than the 24-pixel window of the copy, scaled back, can be found.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .cascade import DEFAULT_CASCADE, HaarCascade, load_cascade
from .evaluate import PackedCascade, pack
from .group import group_rectangles
from .scan import scan_levels

STEP_ONE_FROM_FACTOR = 2.0   # windows move 1 pixel from this factor on, 2 pixels below it
STRIPE_COLUMNS = 32          # OpenCV makes one stripe (one thread task) per 32 columns of level 0

Box = tuple[int, int, int, int]


@lru_cache(maxsize=1)
def default_cascade() -> HaarCascade:
    """The shipped haarcascade_frontalface_default.xml, parsed once."""
    return load_cascade(DEFAULT_CASCADE)


_PACKED: dict[int, tuple[HaarCascade, PackedCascade]] = {}


def _packed(cascade: HaarCascade) -> PackedCascade:
    if id(cascade) not in _PACKED:
        _PACKED[id(cascade)] = (cascade, pack(cascade))
    return _PACKED[id(cascade)][1]


def to_gray(image) -> np.ndarray:
    """A PIL image, an (H, W) uint8 array or an (H, W, 3) uint8 RGB array -> (H, W) uint8 gray.

    Colour goes through Pillow's convert("L") (ITU-R 601-2 luma), which OpenCV's BGR2GRAY
    approximates with other fixed-point rounding: the tests feed both detectors the same gray."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "L" else image.convert("L"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        return np.asarray(Image.fromarray(array).convert("L"))          # (H, W, 3) uint8 is RGB
    if array.ndim != 2:
        raise ValueError(f"image array must be (H, W) gray or (H, W, 3) RGB, got shape {array.shape}")
    return array


def pyramid_scales(image_size: tuple[int, int], window: tuple[int, int], *, scale_factor: float,
                   min_size: tuple[int, int], max_size: tuple[int, int] | None) -> list[np.float32]:
    """The float32 factors OpenCV scans, smallest first (see step 1 of the module docstring)."""
    width, height = image_size
    max_w, max_h = (width, height) if not max_size or 0 in max_size else max_size
    scales, factor = [], 1.0
    while True:
        win_w, win_h = round(window[0] * factor), round(window[1] * factor)   # round half even, as cvRound
        if win_w > max_w or win_h > max_h or win_w > width or win_h > height:
            return scales
        if win_w >= min_size[0] and win_h >= min_size[1]:
            scales.append(np.float32(factor))
        factor *= scale_factor


def detect_candidates(gray: np.ndarray, cascade: HaarCascade, *, scale_factor: float,
                      min_size: tuple[int, int], max_size: tuple[int, int] | None) -> list[Box]:
    """Every window that passes the whole cascade, as a box in image pixels, before grouping."""
    packed = _packed(cascade)
    height, width = gray.shape
    scales = pyramid_scales((width, height), cascade.window, scale_factor=scale_factor,
                            min_size=min_size, max_size=max_size)
    level_sizes = [(int(np.rint(np.float32(width) / f)), int(np.rint(np.float32(height) / f))) for f in scales]
    if not scales:
        return []
    n_stripes = math.ceil(max(level_sizes[0][0] + 1 - cascade.window[0], 0) / STRIPE_COLUMNS)
    steps, row_limits = [], []
    for factor, (level_w, level_h) in zip(scales, level_sizes):
        step = 1 if factor >= STEP_ONE_FROM_FACTOR else 2
        working_rows = max(level_h + 1 - cascade.window[1], 0)
        stripe = max((working_rows // step + n_stripes - 1) // n_stripes, 1) * step
        steps.append(step)
        row_limits.append(n_stripes * stripe)
    hits = scan_levels(gray, level_sizes, packed, steps=steps, row_limits=row_limits)  # per level: (n, 2) x, y

    boxes: list[Box] = []
    for factor, level_hits in zip(scales, hits):
        box_w = int(np.rint(np.float32(cascade.window[0]) * factor))
        box_h = int(np.rint(np.float32(cascade.window[1]) * factor))
        origins = np.rint(level_hits.astype(np.float32) * factor).astype(np.int64)
        boxes.extend((int(x), int(y), box_w, box_h) for x, y in origins)
    return boxes


def _clip(boxes: list[Box], width: int, height: int) -> list[Box]:
    """Intersect each box with the image and drop empty ones (OpenCV's clipObjects)."""
    clipped = []
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            clipped.append((x0, y0, x1 - x0, y1 - y0))
    return clipped


def detect_faces(image, *, scale_factor: float = 1.1, min_neighbors: int = 3,
                 min_size: tuple[int, int] = (30, 30), max_size: tuple[int, int] | None = None,
                 cascade: HaarCascade | None = None, max_side: int | None = None) -> list[Box]:
    """Faces in `image` (PIL image or uint8 array) as (x, y, w, h) boxes in image pixels.

    Same parameters and meaning as OpenCV's detectMultiScale: `scale_factor` > 1 between pyramid
    levels, `min_neighbors` raw hits a box needs beyond itself, `min_size`/`max_size` (w, h) bounds
    of the box (max_size None: the image). min_neighbors=0 returns the raw, ungrouped hits.
    `max_side`: detect on a copy shrunk to at most this many pixels on its longer side (see the
    module docstring); None (the default) keeps OpenCV's exact behaviour."""
    if not scale_factor > 1:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
    if int(min_neighbors) != min_neighbors or min_neighbors < 0:
        raise ValueError(f"min_neighbors must be a non-negative integer, got {min_neighbors}")
    for name, size in (("min_size", min_size), ("max_size", max_size)):
        if size is not None and (len(size) != 2 or min(size) < 0):
            raise ValueError(f"{name} must be (width, height) with non-negative values, got {size}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    cascade = cascade or default_cascade()
    gray = to_gray(image)
    height, width = gray.shape
    if width < cascade.window[0] or height < cascade.window[1]:
        raise ValueError(f"image is {width}x{height}, smaller than the {cascade.window[0]}x"
                         f"{cascade.window[1]} detection window: it cannot hold a face")
    scale_x = scale_y = 1.0
    if max_side and max(width, height) > max_side:
        shrink = max(width, height) / max_side
        small = (max(1, round(width / shrink)), max(1, round(height / shrink)))
        gray = np.asarray(Image.fromarray(gray).resize(small, Image.Resampling.BOX))   # (h', w')
        scale_x, scale_y = width / small[0], height / small[1]
        min_size = (round(min_size[0] / scale_x), round(min_size[1] / scale_y))
        if max_size is not None:
            max_size = (round(max_size[0] / scale_x), round(max_size[1] / scale_y))
    candidates = detect_candidates(gray, cascade, scale_factor=scale_factor,
                                   min_size=tuple(min_size), max_size=max_size)
    boxes = group_rectangles(candidates, int(min_neighbors))
    if (scale_x, scale_y) != (1.0, 1.0):   # back to the image's own pixels
        boxes = [(round(x * scale_x), round(y * scale_y), round(w * scale_x), round(h * scale_y))
                 for x, y, w, h in boxes]
    return _clip(boxes, width, height)
