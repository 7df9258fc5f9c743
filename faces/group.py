"""Merging the raw window hits into one box per object, as OpenCV's `cv::groupRectangles` does.

A face fires the cascade at many nearby positions and scales. OpenCV (objdetect/src/
cascadedetect.cpp) then:

1. partitions the hits into classes: two boxes are "similar" when every edge moves by at most
       delta = eps * (min(w1, w2) + min(h1, h2)) / 2,
   and the classes are the connected components of that relation (`cv::partition`);
2. averages each class (integer sums times float32 1/n, rounded to nearest even);
3. keeps a class only if it has more than `min_neighbors` members, and drops a class whose box
   lies inside another kept class's box (grown by eps on each side) when that other class has
   more members (more than max(3, n)) or this class has fewer than 3.

The detector uses eps = 0.2 (`GROUP_EPS` in detectMultiScale).
"""
from __future__ import annotations

import numpy as np

GROUP_EPS = 0.2


def _similar(boxes: np.ndarray, eps: float) -> np.ndarray:
    """(n, n) bool: OpenCV's SimilarRects predicate between every pair of (x, y, w, h) boxes."""
    x, y, w, h = (boxes[:, i].astype(np.float64) for i in range(4))
    delta = eps * (np.minimum.outer(w, w) + np.minimum.outer(h, h)) * 0.5
    close = lambda a: np.abs(a[:, None] - a[None, :]) <= delta
    return close(x) & close(y) & close(x + w) & close(y + h)


def _partition(similar: np.ndarray) -> np.ndarray:
    """Class label per box: connected components of `similar`, numbered in order of first
    appearance (as cv::partition numbers them). Each box repeatedly takes the smallest index among
    its neighbours until nothing changes; then every component carries its smallest member."""
    n = len(similar)
    smallest = np.arange(n)
    while True:
        reached = np.where(similar, smallest[None, :], n).min(axis=1)
        updated = np.minimum(smallest, reached)
        if np.array_equal(updated, smallest):
            break
        smallest = updated
    _, labels = np.unique(smallest, return_inverse=True)
    return labels


def group_rectangles(boxes, min_neighbors: int, eps: float = GROUP_EPS) -> list[tuple[int, int, int, int]]:
    """Raw hits (x, y, w, h) -> grouped boxes. min_neighbors <= 0 returns the hits unchanged."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if min_neighbors <= 0 or len(boxes) == 0:
        return [tuple(int(v) for v in b) for b in boxes]
    labels = _partition(_similar(boxes, eps))
    n_classes = labels.max() + 1
    totals = np.zeros((n_classes, 4), dtype=np.int64)
    np.add.at(totals, labels, boxes)
    counts = np.bincount(labels, minlength=n_classes)
    inv_count = np.float32(1.0) / counts.astype(np.float32)                     # 1.f / n, float32
    means = np.rint(totals.astype(np.float32) * inv_count[:, None]).astype(np.int64)

    kept = []
    for i in range(n_classes):
        n1 = counts[i]
        if n1 <= min_neighbors:
            continue
        x1, y1, w1, h1 = means[i]
        swallowed = False
        for j in range(n_classes):
            n2 = counts[j]
            if j == i or n2 <= min_neighbors:
                continue
            x2, y2, w2, h2 = means[j]
            dx, dy = int(np.rint(w2 * eps)), int(np.rint(h2 * eps))
            inside = (x1 >= x2 - dx and y1 >= y2 - dy and
                      x1 + w1 <= x2 + w2 + dx and y1 + h1 <= y2 + h2 + dy)
            if inside and (n2 > max(3, n1) or n1 < 3):
                swallowed = True
                break
        if not swallowed:
            kept.append((int(x1), int(y1), int(w1), int(h1)))
    return kept
