"""The image behind an answer: the view of the frame a question was answered on, as a bounded JPEG.

When a question's published state changes, the agent publishes (retained) a JPEG of exactly what the model
answered on: the question's view of the frame encoded for that scene (its region, `capture.views.crop`),
before the model's own preprocessing, downscaled so its longest side is at most `evidence.max_side`. So a
person (or Home Assistant's image entity) can see why the state is what it is.

- Which images: a question's image is offered when its latest counted answer agrees with its published
  value and that value has no image yet, that is with its first value and with every change (`EvidenceLog`).
  An answer reused on an unchanged scene offers nothing: its image is already out.
- How often: at most one image per question per `evidence.min_interval_s` (`EvidencePacer`); a change inside
  the interval holds its image (only the newest one per question) and publishes it once the interval is over.
- How large: a JPEG over `MAX_EVIDENCE_BYTES` is encoded again at half the size, down to `MIN_SIDE` pixels;
  one that still does not fit is skipped with one log line.
"""

from __future__ import annotations

import logging
import typing

import cv2
import numpy as np

from edge_agent.capture.reader import downscaled_to_max_side
from edge_agent.config import EvidenceSettings

log = logging.getLogger(__name__)

MAX_EVIDENCE_BYTES = 256 * 1024
"""The largest image published. mosquitto has no message size limit by default, but every retained image is
kept by the broker and sent to every subscriber (Home Assistant) again after each of its restarts; a 640 px
JPEG of a camera scene takes 30 to 80 KiB."""
MIN_SIDE = 64
"""The smallest longest side an image is shrunk to when it does not fit `MAX_EVIDENCE_BYTES`."""


def evidence_jpeg(view: np.ndarray, settings: EvidenceSettings) -> bytes | None:
    """`view` as a JPEG of longest side at most `settings.max_side` and at most `MAX_EVIDENCE_BYTES`, or None."""
    side = settings.max_side
    while side >= MIN_SIDE:
        ok, encoded = cv2.imencode(
            ".jpg", downscaled_to_max_side(view, side), [cv2.IMWRITE_JPEG_QUALITY, settings.quality]
        )
        if ok and len(encoded) <= MAX_EVIDENCE_BYTES:
            return encoded.tobytes()
        side //= 2
    log.warning(
        "evidence: could not encode a %dx%d view as a JPEG of at most %d bytes", *view.shape[1::-1], MAX_EVIDENCE_BYTES
    )
    return None


class EvidenceLog:
    """Which published value of each question already has its image."""

    def __init__(self) -> None:
        self._shown: dict[str, object] = {}  # question id -> the published (value, state) its last image shows

    def shows_new_value(self, question_id: str, published: object, latest: object) -> bool:
        """Whether the latest counted answer `latest` agrees with the `published` value and that value has no
        image yet; if so, the value counts as shown from now on."""
        if latest != published or self._shown.get(question_id, _NOTHING) == published:
            return False
        self._shown[question_id] = published
        return True


_NOTHING = object()
"""No image yet (a published value may be None)."""


class EvidencePacer:
    """At most one image per question per `min_interval_s`: an image offered sooner waits, replaced by newer
    ones, until the interval since the last image published is over."""

    def __init__(self, min_interval_s: float) -> None:
        self._min_interval_s = min_interval_s
        self._sent_at: dict[str, float] = {}
        self._waiting: dict[str, np.ndarray] = {}

    def offer(self, question_id: str, view: np.ndarray) -> None:
        """Hold `view` as the question's next image (it replaces one still waiting)."""
        self._waiting[question_id] = view

    def due(self, now: float) -> typing.Iterator[tuple[str, np.ndarray]]:
        """Take the waiting images whose question may publish at monotonic time `now` (and count them sent)."""
        for question_id in list(self._waiting):
            sent_at = self._sent_at.get(question_id)
            if sent_at is None or now - sent_at >= self._min_interval_s:
                self._sent_at[question_id] = now
                yield question_id, self._waiting.pop(question_id)
