"""Scanning all pyramid levels: which windows OpenCV tries, and which of them pass the cascade.

Stage 0 runs level by level on the whole window grid (faces/evaluate.py `Grid`). OpenCV's scan
loop has a shortcut that decides which windows are tried at all: when a window fails stage 0,
the next window on the same row is skipped (`if (result == 0) x += yStep` in
`CascadeClassifierInvoker`). We reproduce it exactly (see `_skipped_after_stage0_failures`).

The windows that pass stage 0 from all levels then go through the remaining stages together,
so each stage costs a handful of numpy calls however many levels there are. For that, the
levels' integral images are stacked in one buffer with a common row length (OpenCV's `sbuf`
plays the same role), and a window is the flat index of its top-left corner in that buffer
(for a large photo, a few such groups of levels one after another, to bound the memory).
"""
from __future__ import annotations

import numpy as np

from .evaluate import (Grid, PackedCascade, Points, inv_sigma_and_usable, stage_passes_grid,
                       stage_passes_points)
from .integral import integral_images, tilted_integral
from .resize import resize_bilinear

MAX_BUFFER_VALUES = 1 << 24   # int32 integral values held at once (64 MB)


def _skipped_after_stage0_failures(failed: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: windows OpenCV never tries because the window before it failed stage 0.

    Along a row, window i is tried unless window i-1 was tried and failed stage 0. Inside a run of
    consecutive failures starting at a tried window, the tried ones alternate, so window i is
    skipped exactly when the run of failures ending at i-1 has odd length."""
    cols = np.arange(failed.shape[1])
    last_success = np.maximum.accumulate(np.where(failed, -1, cols), axis=1)  # last non-failure <= i
    run_ending_here = cols - last_success                                     # failures ending at i
    skipped = np.zeros_like(failed)
    skipped[:, 1:] = (run_ending_here[:, :-1] % 2) == 1
    return skipped


def scan_levels(gray: np.ndarray, level_sizes: list[tuple[int, int]], packed: PackedCascade, *,
                steps: list[int], row_limits: list[int]) -> list[np.ndarray]:
    """For each pyramid level (gray resized to level_sizes[i] = (w, h), widest first): (n, 2) int64
    (x, y) of the windows that pass every stage, in that level's pixels.

    `steps[i]` is level i's grid spacing (both directions); `row_limits[i]` caps the window rows
    tried (OpenCV's thread stripes can end before the last row). Levels are scanned in groups
    whose stacked integral images fit MAX_BUFFER_VALUES, so a large photo needs bounded memory."""
    hits, first = [], 0
    channels = 2 if packed.tilted.any() else 1          # the integral, then the tilted integral
    while first < len(level_sizes):
        row_length = channels * (level_sizes[first][0] + 1)   # the group's first level is its widest
        last, rows = first, 0
        while last < len(level_sizes) and (last == first or
                                           (rows + level_sizes[last][1] + 1) * row_length <= MAX_BUFFER_VALUES):
            rows += level_sizes[last][1] + 1
            last += 1
        group = slice(first, last)
        hits += _scan_group(gray, level_sizes[group], packed, steps[group], row_limits[group],
                            np.zeros((rows, row_length), dtype=np.int32))
        first = last
    return hits


def _scan_group(gray, level_sizes, packed: PackedCascade, steps, row_limits, buffer: np.ndarray):
    """scan_levels for levels whose integral images all go into `buffer`, one under the other."""
    win_w, win_h = packed.window
    row_length = buffer.shape[1]
    tilted_shift = level_sizes[0][0] + 1 if packed.tilted.any() else 0   # where each row's tilted sums start
    top, bases, scales, level_of, xs, ys = 0, [], [], [], [], []
    for index, ((width, height), step, row_limit) in enumerate(zip(level_sizes, steps, row_limits)):
        level = resize_bilinear(gray, width, height)
        sums, squares = integral_images(level)                         # (h + 1, w + 1) each
        table = buffer[top:top + sums.shape[0]]                        # this level's rows of the buffer
        table[:, :sums.shape[1]] = sums
        if tilted_shift:
            table[:, tilted_shift:tilted_shift + sums.shape[1]] = tilted_integral(level)
        n_cols = max(sums.shape[1] - win_w, 0)                         # OpenCV's getWorkingSize
        n_rows = max(min(sums.shape[0] - win_h, row_limit), 0)
        grid = Grid(step, -(-n_rows // step), -(-n_cols // step))
        if grid.n_rows and grid.n_cols:
            inv_sigma, usable = inv_sigma_and_usable(grid, sums, squares, packed.window)  # (rows, cols)
            passed = stage_passes_grid(grid, table, packed, packed.stages[0], inv_sigma, tilted_shift)
            tried = ~_skipped_after_stage0_failures(usable & ~passed)
            rows, cols = np.nonzero(usable & passed & tried)
            x, y = cols * step, rows * step
            bases.append((top + y) * row_length + x)
            scales.append(inv_sigma[rows, cols])
            level_of.append(np.full(len(x), index))
            xs.append(x)
            ys.append(y)
        top += sums.shape[0]

    if not bases:
        return [np.zeros((0, 2), dtype=np.int64) for _ in level_sizes]
    points = Points(np.concatenate(bases), row_length)
    inv_sigma, level_of = np.concatenate(scales), np.concatenate(level_of)
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    for stage in packed.stages[1:]:
        if not len(points.base):
            break
        alive = stage_passes_points(points, buffer, packed, stage, inv_sigma, tilted_shift)
        points.base, inv_sigma = points.base[alive], inv_sigma[alive]
        level_of, xs, ys = level_of[alive], xs[alive], ys[alive]
    return [np.stack([xs[level_of == i], ys[level_of == i]], axis=1) for i in range(len(level_sizes))]
