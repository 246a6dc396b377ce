"""The scene gate: decides whether a frame differs enough from the last encoded one to be worth encoding.

Encoding a frame with the vision model costs about a second; comparing two thumbnails costs well under a millisecond.
The gate compares a small, grayscale, blurred thumbnail of each frame with the thumbnail of the last frame
the service *accepted* (encoded), so slow drift accumulates against that reference instead of hiding in
small frame-to-frame steps.

Two measures, so that neither a small change nor a global one slips through: the mean difference over the
whole thumbnail, and the largest mean difference over any cell of an 8 x 8 grid. A person stepping into a
corner moves one cell a lot and the whole frame very little (on the demo's kiosk room: 0.10 in the cell,
0.008 overall, against 0.001 of camera noise), so a cell counts as changed at `LOCAL_FACTOR` times the
threshold.

Lighting: the comparison is on raw brightness, so switching a light on or off counts as a change (the
answers may well depend on it), while small exposure drift stays under a sensible threshold.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from edge_agent.config import SceneGateSettings

# Kernel of the blur applied to the thumbnail: it evens out sensor noise and one-pixel jitter.
BLUR_KERNEL = (3, 3)
GRID_CELLS = 8
"""Cells per side of the grid whose largest difference catches changes confined to a small area."""
LOCAL_FACTOR = 3.0
"""A cell counts as changed when its mean difference exceeds this many times `threshold` (exposure drift
of a few percent stays below it even in the brightest cell)."""


class SceneGate:
    """Remembers the last accepted frame and says whether a new frame differs from it."""

    def __init__(self, settings: SceneGateSettings) -> None:
        self._settings = settings
        self._reference: np.ndarray | None = None
        self._reference_ts = 0.0

    def changed(self, image: np.ndarray, ts: float | None = None) -> bool:
        """Whether `image` (BGR, taken at wall-clock `ts`, default now) should be encoded again."""
        if self._reference is None:
            return True
        if self._settings.max_unchanged_s > 0:
            age = (time.time() if ts is None else ts) - self._reference_ts
            if age >= self._settings.max_unchanged_s:
                return True
        overall, local = self.differences(image)
        return overall > self._settings.threshold or local > LOCAL_FACTOR * self._settings.threshold

    def difference(self, image: np.ndarray) -> float:
        """Mean absolute difference between `image` and the reference, as a fraction of full brightness."""
        return self.differences(image)[0]

    def differences(self, image: np.ndarray) -> tuple[float, float]:
        """(mean difference over the whole thumbnail, largest mean difference of a grid cell), 0..1."""
        if self._reference is None:
            return 1.0, 1.0
        diff = cv2.absdiff(self._thumbnail(image), self._reference).astype(np.float32) / 255.0
        cell = self._settings.size // GRID_CELLS
        if cell == 0:
            return float(diff.mean()), float(diff.mean())
        grid = diff[: cell * GRID_CELLS, : cell * GRID_CELLS].reshape(GRID_CELLS, cell, GRID_CELLS, cell)
        return float(diff.mean()), float(grid.mean(axis=(1, 3)).max())

    def accept(self, image: np.ndarray, ts: float) -> None:
        """Make `image` (taken at wall-clock `ts`) the reference: the service encoded it."""
        self._reference = self._thumbnail(image)
        self._reference_ts = ts

    def _thumbnail(self, image: np.ndarray) -> np.ndarray:
        side = self._settings.size
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        return cv2.GaussianBlur(gray, BLUR_KERNEL, 0)
