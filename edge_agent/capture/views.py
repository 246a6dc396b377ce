"""Views: the part of a camera frame a question looks at, a region given in fractions of the frame.

A region `(x0, y0, x1, y1)` names the rectangle from the point `(x0, y0)` to `(x1, y1)`, both in fractions
of the frame's width and height (0..1, left to right and top to bottom), so one region fits every
resolution of a camera. `None` is the whole frame. The model sees the crop through its own preprocessing,
so a small area gets the model's full input resolution instead of a few pixels of a downscaled frame.
"""

from __future__ import annotations

import math

import numpy as np

from edge_agent.config import Region


def pixel_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels `region` covers in a `width` x `height` frame: (left, top, right, bottom), right and bottom
    exclusive; every pixel the region touches, and at least one pixel."""
    x0, y0, x1, y1 = region
    left, top = min(int(x0 * width), width - 1), min(int(y0 * height), height - 1)
    right, bottom = math.ceil(x1 * width), math.ceil(y1 * height)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crop(image: np.ndarray, region: Region | None) -> np.ndarray:
    """The view of `image` (H x W [x C]) that `region` names; the whole image for None. A numpy view, no copy."""
    if region is None:
        return image
    left, top, right, bottom = pixel_box(region, image.shape[1], image.shape[0])
    return image[top:bottom, left:right]


def region_text(region: Region) -> str:
    """How a region is written in config.yaml (the status page's `region:` line): `[0.6, 0.2, 0.9, 0.5]`."""
    return "[" + ", ".join(f"{edge:g}" for edge in region) + "]"
