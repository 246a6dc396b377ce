"""Pillow's resampling, reproduced exactly in numpy.

LLaVA checkpoints were trained with images resized by Pillow (Hugging Face processors still use it),
and OpenCV's resize differs from it (no antialiasing when shrinking, other rounding). A camera frame
resized with OpenCV would shift every pixel a little; here we compute what Pillow computes, bit for bit,
without importing it: the same filter support scaled by the shrink factor, the same coefficients rounded
to 22-bit fixed point, two separable passes with 8-bit rounding in between, in the order Pillow 13
picks (vertical first when the height shrinks more than twice as much as the width, else horizontal first).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # as in Pillow's Resample.c for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


# Pillow's resample ids (PIL.Image.Resampling) -> (filter, support)
_FILTERS = {2: (_bilinear, 1.0), 3: (_bicubic, 2.0)}


@functools.lru_cache(maxsize=32)
def _coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: the first input index and the fixed-point weights of its window.

    Cached (read-only): a camera's frames all have one size, and computing these costs a third of a resize.
    """
    kernel, base_support = _FILTERS[resample]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = base_support * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, dtype=np.intp)
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = kernel((np.arange(xmax) + xmin - center + 0.5) / filter_scale)
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        starts[xx] = xmin
        weights[xx, :xmax] = taps
    fixed = np.where(
        weights < 0, np.trunc(-0.5 + weights * (1 << _PRECISION_BITS)), np.trunc(0.5 + weights * (1 << _PRECISION_BITS))
    )
    fixed = fixed.astype(np.int32)
    starts.flags.writeable = fixed.flags.writeable = False
    return starts, fixed


def _resample_axis(image: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    """One Pillow pass along `axis` (0 = rows/vertical, 1 = columns/horizontal) of an HxWxC uint8 image."""
    in_size = image.shape[axis]
    starts, weights = _coefficients(in_size, out_size, resample)
    ksize = weights.shape[1]
    # Window indices past the edge carry weight 0; clamp them so the gather stays in bounds.
    index = np.minimum(starts[:, None] + np.arange(ksize)[None, :], in_size - 1)
    # The resampled axis first and contiguous, so each tap gathers whole rows; gathered as uint8, the product
    # with the int32 weights is int32, which is enough: 255 * (sum of |weights| ~ 1.2 * 2**22) < 2**31, as in
    # Pillow's own INT32 sums. (Gathering strided int32 copies instead took 2.7x as long.)
    source = np.ascontiguousarray(np.moveaxis(image, axis, 0))
    acc = np.full((out_size,) + source.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for tap in range(ksize):
        column = weights[:, tap].reshape((out_size,) + (1,) * (source.ndim - 1))
        acc += source[index[:, tap]] * column
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def pil_resize(image: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """Resize an HxWxC uint8 image as `PIL.Image.resize((width, height), resample)` would.

    `resample` uses Pillow's ids: 2 = bilinear, 3 = bicubic (what CLIP processors use).
    """
    if resample not in _FILTERS:
        raise ValueError(f"unsupported resample filter {resample} (supported: 2 bilinear, 3 bicubic)")
    in_height, in_width = image.shape[:2]
    vertical_first = in_height - height > 0 and in_height - height > (in_width - width) * 2
    passes = [(height, 0), (width, 1)] if vertical_first else [(width, 1), (height, 0)]
    out = image
    for size, axis in passes:
        if size != image.shape[axis]:
            out = _resample_axis(out, size, axis=axis, resample=resample)
    return out if out is not image else image.copy()
