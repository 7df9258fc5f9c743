"""Integral images: any rectangle sum in four look-ups (Viola & Jones 2001, section 2.1).

    S[y, x] = sum of image[:y, :x]            shape (H + 1, W + 1), a zero first row and column
    sum over rows y0..y1-1, cols x0..x1-1 = S[y1, x1] - S[y0, x1] - S[y1, x0] + S[y0, x0]

The squared integral Q (the same over image**2) gives each window's variance, which normalises the
features against lighting (the paper's "Image Processing" paragraph: sigma^2 = mean(x^2) - mean(x)^2).

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


def tilted_integral(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H + 1, W + 1) int32 sums over 45-degree triangles: the rotated summed area
    table of Lienhart & Maydt 2002 ("An Extended Set of Haar-like Features for Rapid Object
    Detection"), with OpenCV's indexing (cv::integral's `tilted` output):

        T[Y, X] = sum of image[y, x] over y < Y and |x - (X - 1)| <= Y - 1 - y

    i.e. the triangle whose apex is pixel (X - 1, Y - 1) and which widens upwards. Row by row:

        T[Y, X] = T[Y-1, X-1] + T[Y-1, X+1] - T[Y-2, X] + I[Y-1, X-1] + I[Y-2, X-1]

    The triangles reach past the left and right edges, so the rows are computed on a table padded
    by H columns on each side (pixels there are 0) and cut back to W + 1 columns at the end."""
    height, width = image.shape
    pad = height + 1
    pixels = np.zeros((height, width + 2 * pad), dtype=np.int32)   # column c holds image column c - pad
    pixels[:, pad:pad + width] = image
    table = np.zeros((height + 1, width + 2 * pad + 1), dtype=np.int32)   # column X + pad is T[., X]
    for y in range(1, height + 1):
        above = table[y - 1]
        row = np.zeros_like(above)
        row[1:-1] = above[:-2] + above[2:]                 # T[Y-1, X-1] + T[Y-1, X+1]
        if y >= 2:
            row -= table[y - 2]
            row[1:] += pixels[y - 2]                        # I[Y-2, X-1]
        row[1:] += pixels[y - 1]                            # I[Y-1, X-1]
        table[y] = row
    return table[:, pad:pad + width + 1]
