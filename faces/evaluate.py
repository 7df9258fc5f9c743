"""The cascade's arithmetic on a batch of windows, vectorised with numpy.

For a window at (x, y) of an (already resized) level image, OpenCV's `HaarEvaluator::setWindow`
and `predictOrderedStump` (objdetect/src/cascadedetect.{hpp,cpp}) compute, and so do we:

1. the variance normaliser over the window's inner (w-2) x (h-2) rectangle `normrect`
   (area A = 22 * 22 for faces; S = pixel sum, Q = squared-pixel sum, both exact integers):
       nf = A * Q - S^2  (float64),    inv_sigma = float32(1 / sqrt(nf))
   (Viola & Jones 2001, "Image Processing": sigma^2 = Q/A - (S/A)^2, so inv_sigma = 1/(A sigma)).
   A window with nf <= 0 or A * inv_sigma >= 0.1 (an almost flat patch) is rejected outright;
2. each Haar feature: (w0 * sum_0 + w1 * sum_1) + w2 * sum_2 in float32, times inv_sigma; a
   tilted feature's rectangle sums come from the tilted integral (faces/integral.py);
3. each weak tree: go left if value < node threshold, else right, until a leaf; the stage sum
   adds the leaves one after another in float64; the window fails if sum < stage threshold.

Windows are named in two ways. `Grid`: every window of a regular grid on one level, where a
corner look-up is one strided view of the integral image (fast when most windows are alive, as
in stage 0). `Points`: any set of windows, by the flat index of their top-left corner in an
integral buffer; later stages gather only the corners of the windows still alive. When the
cascade has tilted features, each row of the table holds a level's integral and then, starting
`tilted_shift` columns further right, its tilted integral.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cascade import HaarCascade

FLAT_PATCH_LIMIT = 0.1          # setWindow rejects a window when A * inv_sigma >= 0.1
MAX_GATHER = 1 << 17            # corners gathered at once (bounds the temporaries)


@dataclass(frozen=True)
class StageArrays:
    threshold: float             # float32 value, compared in float64
    features: np.ndarray         # (n,) feature index of each stump
    node_threshold: np.ndarray   # (n,) float32
    left: np.ndarray             # (n,) float32 leaf taken when value < node_threshold
    right: np.ndarray            # (n,) float32
    trees: tuple                 # non-stump trees: (left, right, feature, threshold, leaves) each;
                                 # empty for a stump cascade
    sums_exact: bool             # every sum of these leaves is exact in float64 (see _sums_are_exact)


def _sums_are_exact(left: np.ndarray, right: np.ndarray) -> bool:
    """True when any sum of some of the float32 values right, left - right (and of the leaves
    themselves) is exact in float64, whatever the order of the additions.

    A float32 is an integer times 2^(e - 24) (e from frexp), so all these values are multiples
    of q = 2^(smallest e - 24); a sum of them is exact while its magnitude stays below 2^53 q.
    Then the stage sum can be taken as sum(right) + mask @ (left - right), a dot product in any
    order, and still equal OpenCV's left-to-right double sum of the chosen leaves, bit for bit."""
    values = np.concatenate([left, right]).astype(np.float64)
    nonzero = values[values != 0]
    if not len(nonzero):
        return True
    quantum = 2.0 ** (np.frexp(nonzero)[1].min() - 24)
    bound = np.abs(right).sum(dtype=np.float64) + np.abs(left.astype(np.float64) - right).sum()
    return bool(bound < 2.0 ** 53 * quantum)


@dataclass(frozen=True)
class PackedCascade:
    """The cascade as flat arrays, ready for vectorised evaluation."""
    window: tuple[int, int]      # (width, height)
    corners: np.ndarray          # (F, 3, 4, 2) int64: (dy, dx) of each rectangle's corners p0..p3;
                                 # rect sum = S[p0] - S[p1] - S[p2] + S[p3]
    weights: np.ndarray          # (F, 3) float32 (an unused third rectangle has weight 0)
    tilted: np.ndarray           # (F,) bool: corners index the tilted integral
    stages: tuple[StageArrays, ...]

    def feature_corners(self, features, tilted_shift: int) -> np.ndarray:
        """(..., 3, 4, 2) corners of these features in a table whose tilted integral starts
        `tilted_shift` columns to the right of the plain one."""
        corners = self.corners[features].copy()
        corners[..., 1] += tilted_shift * self.tilted[features][..., None, None]
        return corners


def pack(cascade: HaarCascade) -> PackedCascade:
    n = len(cascade.features)
    rects = np.zeros((n, 3, 4), dtype=np.int64)
    weights = np.zeros((n, 3), dtype=np.float32)
    for i, feature in enumerate(cascade.features):
        rects[i, :len(feature.rects)] = feature.rects
        weights[i, :len(feature.weights)] = feature.weights
    x, y, w, h = (rects[..., k] for k in range(4))
    upright = np.stack([np.stack([y, x], -1), np.stack([y, x + w], -1),
                        np.stack([y + h, x], -1), np.stack([y + h, x + w], -1)], axis=2)  # (F, 3, 4, 2)
    # A tilted rectangle starts at (x, y) and runs w pixels down-right and h pixels down-left
    # (OpenCV's CV_TILTED_OFS): its corners in the tilted integral, in the same sign order.
    slanted = np.stack([np.stack([y, x], -1), np.stack([y + h, x - h], -1),
                        np.stack([y + w, x + w], -1), np.stack([y + w + h, x + w - h], -1)], axis=2)
    tilted = np.array([f.tilted for f in cascade.features], dtype=bool)
    corners = np.where(tilted[:, None, None, None], slanted, upright)
    stages = []
    for stage in cascade.stages:
        stumps = [t for t in stage.trees if len(t.feature) == 1]
        if len(stumps) != len(stage.trees):      # a tree cascade: keep every tree as it is
            stumps = []
        left = np.array([t.leaves[-t.left[0]] for t in stumps], dtype=np.float32)
        right = np.array([t.leaves[-t.right[0]] for t in stumps], dtype=np.float32)
        stages.append(StageArrays(
            threshold=float(stage.threshold),
            features=np.array([t.feature[0] for t in stumps], dtype=np.int64),
            node_threshold=np.array([t.threshold[0] for t in stumps], dtype=np.float32),
            left=left, right=right,
            trees=() if stumps else tuple(
                (np.array(t.left), np.array(t.right), np.array(t.feature),
                 np.array(t.threshold, dtype=np.float32), np.array(t.leaves, dtype=np.float32))
                for t in stage.trees),
            sums_exact=_sums_are_exact(left, right)))
    return PackedCascade(window=cascade.window, corners=corners, weights=weights, tilted=tilted,
                         stages=tuple(stages))


class Grid:
    """All windows of a regular grid on one level: corner look-ups are strided views."""

    def __init__(self, step: int, n_rows: int, n_cols: int):
        self.step, self.n_rows, self.n_cols = step, n_rows, n_cols

    def corner(self, table: np.ndarray, dy: int, dx: int) -> np.ndarray:
        stop_y, stop_x = dy + self.step * (self.n_rows - 1) + 1, dx + self.step * (self.n_cols - 1) + 1
        return table[dy:stop_y:self.step, dx:stop_x:self.step]           # (n_rows, n_cols)


class Points:
    """Any set of windows, named by the flat index of their top-left corner in a 2-D table."""

    def __init__(self, base: np.ndarray, row_length: int):
        self.base, self.row_length = base, row_length

    def corner(self, table: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return table.ravel()[self.base + (dy * self.row_length + dx)]    # (n,)


def _rect_sum(windows, table: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Sum over one rectangle given by its (4, 2) corners, for every window (int32, exact)."""
    (y0, x0), (y1, x1), (y2, x2), (y3, x3) = corners
    return (windows.corner(table, y0, x0) - windows.corner(table, y1, x1)
            - windows.corner(table, y2, x2) + windows.corner(table, y3, x3))


def inv_sigma_and_usable(windows, sums: np.ndarray, squares: np.ndarray, window: tuple[int, int]):
    """float32 1/sqrt(A*Q - S^2) over the inner rectangle, and which windows are not flat."""
    w, h = window[0] - 2, window[1] - 2
    inner = np.array([[1, 1], [1, 1 + w], [1 + h, 1], [1 + h, 1 + w]])
    area = float(w * h)
    s = _rect_sum(windows, sums, inner).astype(np.float64)
    q = _rect_sum(windows, squares, inner).astype(np.float64)
    nf = area * q - s * s
    positive = nf > 0
    inv_sigma = np.ones(nf.shape, dtype=np.float32)
    inv_sigma[positive] = (1.0 / np.sqrt(nf[positive])).astype(np.float32)
    usable = positive & (area * inv_sigma.astype(np.float64) < FLAT_PATCH_LIMIT)
    return inv_sigma, usable


def feature_value(windows, table: np.ndarray, packed: PackedCascade, index: int, inv_sigma: np.ndarray,
                  tilted_shift: int):
    """float32 value of Haar feature `index`, variance-normalised, for every window."""
    weights, corners = packed.weights[index], packed.feature_corners(index, tilted_shift)
    total = (weights[0] * _rect_sum(windows, table, corners[0]).astype(np.float32)
             + weights[1] * _rect_sum(windows, table, corners[1]).astype(np.float32))
    if weights[2] != 0:                            # OpenCV adds the third rectangle only if it has weight
        total = total + weights[2] * _rect_sum(windows, table, corners[2]).astype(np.float32)
    return total * inv_sigma


def stage_passes_grid(grid: Grid, table: np.ndarray, packed: PackedCascade, stage: StageArrays,
                      inv_sigma: np.ndarray, tilted_shift: int) -> np.ndarray:
    """Stage decision for every window of a grid (stumps: one strided view per corner)."""
    if stage.trees:
        return _tree_stage_passes(grid, table, packed, stage, inv_sigma, tilted_shift)
    stage_sum = np.zeros(inv_sigma.shape, dtype=np.float64)
    for feature, node_threshold, left, right in zip(stage.features, stage.node_threshold, stage.left, stage.right):
        value = feature_value(grid, table, packed, int(feature), inv_sigma, tilted_shift)
        stage_sum = stage_sum + np.where(value < node_threshold, left, right)
    return stage_sum >= stage.threshold


def _stage_plan(packed: PackedCascade, stage: StageArrays, row_length: int, tilted_shift: int):
    """Which buffer offsets a stage reads, and how its rectangles are built from them.

    Returns (offsets (U,), corner_rows (R, 4), rect_weight (R,), rect_of_stump (n, 3)) where the
    R rectangles are the stumps' rectangles with non-zero weight, corner_rows index `offsets`,
    and rect_of_stump[:, 2] is -1 for two-rectangle features. Reading each distinct corner once
    saves about a third of the reads (neighbouring features share corners)."""
    corners = packed.feature_corners(stage.features, tilted_shift)          # (n, 3, 4, 2)
    weights = packed.weights[stage.features]                                # (n, 3)
    used = weights != 0
    used[:, :2] = True                                                      # OpenCV always adds rects 0, 1
    flat_corners = corners[..., 0] * row_length + corners[..., 1]           # (n, 3, 4)
    offsets, corner_rows = np.unique(flat_corners[used], return_inverse=True)
    rect_of_stump = np.full(used.shape, -1)
    rect_of_stump[used] = np.arange(used.sum())
    return offsets, corner_rows.reshape(-1, 4), weights[used], rect_of_stump


def stage_passes_points(points: Points, buffer: np.ndarray, packed: PackedCascade, stage: StageArrays,
                        inv_sigma: np.ndarray, tilted_shift: int) -> np.ndarray:
    """Stage decision for a set of windows, laid out (things, windows) so that every step after
    the one gather of corners works on contiguous rows; in chunks, to keep the temporaries small."""
    if stage.trees:
        return _tree_stage_passes(points, buffer, packed, stage, inv_sigma, tilted_shift)
    offsets, corner_rows, rect_weight, rect_of_stump = _stage_plan(packed, stage, points.row_length, tilted_shift)
    first, second, third = rect_of_stump.T
    has_third = np.nonzero(third >= 0)[0]
    flat = buffer.ravel()
    right_total = stage.right.sum(dtype=np.float64)                           # the stage sum if no stump goes left
    leaf_step = stage.left.astype(np.float64) - stage.right                   # what going left adds

    def chunk_passes(start: int) -> np.ndarray:
        base, scale = points.base[start:start + chunk], inv_sigma[start:start + chunk]
        values = np.take(flat, offsets[:, None] + base[None, :])              # (U, m) int32
        c = values[corner_rows]                                               # (R, 4, m)
        rect_sums = c[:, 0] - c[:, 1] - c[:, 2] + c[:, 3]                     # (R, m) int32
        terms = np.multiply(rect_sums, rect_weight[:, None], dtype=np.float32)  # (R, m) float32
        value = terms[first] + terms[second]                                  # (n, m)
        value[has_third] = value[has_third] + terms[third[has_third]]
        goes_left = value * scale[None, :] < stage.node_threshold[:, None]    # (n, m)
        if stage.sums_exact:                                                  # one dot product, exact
            stage_sum = right_total + leaf_step @ goes_left.astype(np.float64)
        else:                                                                 # the leaves one by one
            stage_sum = np.zeros(len(base))
            for row in np.where(goes_left, stage.left[:, None], stage.right[:, None]):
                stage_sum = stage_sum + row
        return stage_sum >= stage.threshold

    chunk = max(1, MAX_GATHER // len(offsets))
    return np.concatenate([chunk_passes(start) for start in range(0, max(len(points.base), 1), chunk)])


def _tree_stage_passes(windows, table, packed, stage: StageArrays, inv_sigma, tilted_shift) -> np.ndarray:
    """Cascades of deeper trees: walk every window down each tree from its root (node 0)."""
    stage_sum = np.zeros(inv_sigma.shape, dtype=np.float64)
    for left, right, feature, node_threshold, leaves in stage.trees:
        node = np.zeros(inv_sigma.shape, dtype=np.int64)   # > 0: internal node, <= 0: leaf -node
        active = np.ones(inv_sigma.shape, dtype=bool)      # still inside the tree
        while active.any():
            for i in np.unique(node[active]):
                here = active & (node == i)
                value = feature_value(windows, table, packed, int(feature[i]), inv_sigma, tilted_shift)
                node[here] = np.where(value < node_threshold[i], left[i], right[i])[here]
            active = node > 0
        stage_sum = stage_sum + leaves[-node]
    return stage_sum >= stage.threshold
