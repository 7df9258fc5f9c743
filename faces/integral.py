"""Integral images: any rectangle sum in four look-ups (Viola & Jones 2001, section 2.1).

    S[y, x] = sum of image[:y, :x]            shape (H + 1, W + 1), a zero first row and column
    sum over rows y0..y1-1, cols x0..x1-1 = S[y1, x1] - S[y0, x1] - S[y1, x0] + S[y0, x0]

The squared integral Q (the same over image**2) gives each window's variance, which normalises the
features against lighting (section 5.6 of the paper: sigma^2 = mean(x^2) - mean(x)^2).

Like OpenCV (`cv::integral(img, sum, sqsum, CV_32S, CV_32S)`), both are int32 and may wrap
around on large images: a window's sum is a difference of corners, exact modulo 2^32, and every
window sum we take is far below 2^31, so the wrapped arithmetic gives the exact value.
"""
from __future__ import annotations

import numpy as np


def integral_images(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 -> (S, Q), each (H + 1, W + 1) int32: sums of pixels and of squared pixels."""
    height, width = image.shape
    pixels = image.astype(np.int32)
    sums = np.zeros((height + 1, width + 1), dtype=np.int32)
    squares = np.zeros((height + 1, width + 1), dtype=np.int32)
    np.cumsum(np.cumsum(pixels, axis=0, dtype=np.int32), axis=1, dtype=np.int32, out=sums[1:, 1:])
    np.cumsum(np.cumsum(pixels * pixels, axis=0, dtype=np.int32), axis=1, dtype=np.int32, out=squares[1:, 1:])
    return sums, squares
