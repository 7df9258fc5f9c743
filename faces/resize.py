"""Bilinear down-scaling of an 8-bit gray image, bit-exact with OpenCV's INTER_LINEAR_EXACT.

The cascade detector sees every pyramid level through this resize (OpenCV 4.x
`FeatureEvaluator::setImage` calls `cv::resize(..., INTER_LINEAR_EXACT)`), and a one-grey-level
difference in a pixel can flip a weak classifier near its threshold, so we follow OpenCV's
arithmetic (imgproc/src/resize.cpp: `interpolationLinear`, `hlineResizeCn`, `vlineResize`), not
Pillow's (Pillow's bilinear filter widens its support when it shrinks, OpenCV's does not):

* pixel-centre convention: destination pixel d samples the source at
      s = (d + 0.5) * scale - 0.5,    scale = 1 / (dst_size / src_size),   all in float64;
* the sample left of pixel 0 takes pixel 0, the sample at or beyond the last pixel takes the
  last pixel; otherwise the taps are floor(s) and floor(s) + 1 with weights
      w1 = round_half_even(frac(s) * 256),   w0 = 256 - w1        (8-bit fixed point);
* a horizontal pass keeps h = w0 * p[x0] + w1 * p[x0 + 1]     (8 fractional bits, fits uint16),
* a vertical pass does the same on two rows of h and rounds the 16 fractional bits away:
      out = (v0 * h[y0] + v1 * h[y0 + 1] + 2^15) >> 16.
"""
from __future__ import annotations

import numpy as np

COEF_BITS = 8                  # ufixedpoint16 in OpenCV: 8 fractional bits
COEF_ONE = 1 << COEF_BITS      # 256, the fixed-point 1.0


def _taps(src_len: int, dst_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each destination index: first source index and the two fixed-point weights."""
    scale = 1.0 / (dst_len / src_len)                                  # float64, as OpenCV
    pos = (np.arange(dst_len, dtype=np.float64) + 0.5) * scale - 0.5
    first = np.floor(pos).astype(np.int64)
    w1 = np.rint((pos - first) * COEF_ONE).astype(np.int32)           # round half to even
    outside = (first < 0) | (first >= src_len - 1)
    first = np.clip(first, 0, src_len - 1)
    w1[outside] = 0
    return first, COEF_ONE - w1, w1


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) uint8 -> (height, width) uint8, bit-exact with cv2.resize(..., INTER_LINEAR_EXACT)."""
    src_h, src_w = image.shape
    if (width, height) == (src_w, src_h):
        return image.copy()
    x0, a0, a1 = _taps(src_w, width)
    y0, b0, b1 = _taps(src_h, height)
    x1 = np.minimum(x0 + 1, src_w - 1)
    y1 = np.minimum(y0 + 1, src_h - 1)

    pixels = image.astype(np.int32)
    horizontal = pixels[:, x0] * a0 + pixels[:, x1] * a1  # (H, width), 8 fractional bits
    top, bottom = horizontal[y0], horizontal[y1]          # (height, width)
    out = (top * b0[:, None] + bottom * b1[:, None] + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS)
    return np.minimum(out, 255).astype(np.uint8)
