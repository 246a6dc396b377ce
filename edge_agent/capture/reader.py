"""The camera reader: a thread that keeps only the newest frame of a source and tracks whether it is online.

The thread reads the source as fast as the source delivers (so stream buffers never fill with old frames),
keeps at most `fps` frames a second in a one-slot buffer, reports the source offline after `stale_after_s`
without a usable frame or on a failed read, and reopens a lost source with exponential backoff. A read that
blocks is bounded by the source (`read_timeout_s` for streams), so a hung stream is reported offline after
at most about `max(stale_after_s, read_timeout_s)`.

Frames larger than `MAX_FRAME_SIDE` are shrunk as they are kept: the vision models see at most about a
thousand pixels a side, while an 8K frame would hold 100 MB in the buffer and cost seconds to preprocess.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from edge_agent.capture.sources import Source, SourceEnded, SourceUnavailable, Ticker, open_source
from edge_agent.config import CameraSettings
from edge_agent.redact import redact_url

log = logging.getLogger(__name__)

MAX_FRAME_SIDE = 1920
"""Longest side, in pixels, of a kept frame; larger frames are downscaled keeping their aspect ratio."""


@dataclass(frozen=True)
class Frame:
    """One frame as kept by the reader."""

    image: np.ndarray
    """BGR, uint8, height x width x 3, neither side longer than `MAX_FRAME_SIDE`."""
    ts: float
    """Wall-clock time (`time.time()`) when the frame was read from the source, so its age is honest."""
    seq: int
    """Increases with every frame the reader keeps; never reused by the same reader."""


def to_bgr(image: np.ndarray | None) -> np.ndarray | None:
    """`image` as BGR uint8 height x width x 3, or None if it is empty or has a layout no camera produces.

    Grayscale, BGRA and 16-bit images (some cameras, PNG files) are converted.
    """
    if image is None or image.size == 0:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        return None
    channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else 0
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image if channels == 3 else None


def downscaled_to_max_side(image: np.ndarray, max_side: int = MAX_FRAME_SIDE) -> np.ndarray:
    """`image` downscaled (area averaging, aspect ratio kept) so that neither side exceeds `max_side`."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class Backoff:
    """Waits that double after each failure in a row, from `initial_s` up to `max_s`."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._next_s = initial_s

    def next_delay(self) -> float:
        delay, self._next_s = self._next_s, min(self._next_s * 2, self._max_s)
        return delay

    def reset(self) -> None:
        self._next_s = self._initial_s


class CameraReader:
    """Reads one source on a background thread; `latest()` hands out its newest frame.

    `on_status(online)` is called from the reader thread whenever the source goes online or offline
    (the first call says whether the first open worked). `on_frame()`, from the same thread, follows every
    frame kept: one loop can wait for the first new frame of any of several readers.
    """

    def __init__(
        self,
        settings: CameraSettings,
        on_status: Callable[[bool], None] | None = None,
        on_frame: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._name = redact_url(settings.source_text)
        self._on_status = on_status
        self._on_frame = on_frame
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._slot_changed = threading.Condition()
        self._latest: Frame | None = None
        self._online: bool | None = None
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._thread = threading.Thread(target=self._run, name="camera-reader", daemon=True)
        self.frames_read = 0
        """Frames kept in the buffer so far (at most `fps` a second)."""
        self.reopen_count = 0
        """Attempts to open the source again after losing it."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to `timeout` seconds for it (a blocked stream open may take longer)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def online(self) -> bool:
        """Whether frames are flowing from the source."""
        return self._online is True

    def latest(self, after_seq: int = -1, timeout: float = 0.0) -> Frame | None:
        """The newest frame with `seq > after_seq`, waiting up to `timeout` seconds for one; else None."""
        with self._slot_changed:
            self._slot_changed.wait_for(lambda: self._has_newer(after_seq) or self._finished.is_set(), timeout)
            return self._latest if self._has_newer(after_seq) else None

    @property
    def ended(self) -> bool:
        """Whether the reader has stopped for good (a video file or folder played to its end, or `stop()`)."""
        return self._finished.is_set()

    def _has_newer(self, after_seq: int) -> bool:
        return self._latest is not None and self._latest.seq > after_seq

    def _run(self) -> None:
        try:
            self._read_and_reopen()
        except SourceEnded:
            log.info("capture: %s played to its end", self._name)
            self._set_online(False)
        finally:
            with self._slot_changed:
                self._finished.set()
                self._slot_changed.notify_all()

    def _read_and_reopen(self) -> None:
        while not self._stopped.is_set():
            self._read_until_lost()
            if self._stopped.wait(self._backoff.next_delay()):
                return
            self.reopen_count += 1

    def _read_until_lost(self) -> None:
        """Open the source and keep its frames until it fails, goes away or the reader stops."""
        try:
            source = open_source(self._settings, self._stopped)
            try:
                self._keep_frames(source)
            finally:
                source.close()
        except SourceUnavailable as error:
            log.warning("capture: %s", error)
        except SourceEnded:
            raise
        except Exception:  # noqa: BLE001 - an odd stream (cv2.error) must not end capture for good
            log.exception("capture: %s failed unexpectedly", self._name)
        if not self._stopped.is_set():
            self._set_online(False)

    def _keep_frames(self, source: Source) -> None:
        """Keep up to `fps` frames a second until a read fails or no usable frame came for `stale_after_s`."""
        sampler = Ticker(1.0 / self._settings.fps)
        last_kept = time.monotonic()
        while not self._stopped.is_set() and source.grab():
            if sampler.due() and self._keep(source.retrieve(), time.time()):
                last_kept = time.monotonic()
            elif time.monotonic() - last_kept > self._settings.stale_after_s:
                log.warning("capture: %s: no usable frame for %.1f s", self._name, self._settings.stale_after_s)
                return

    def _keep(self, image: np.ndarray | None, ts: float) -> bool:
        """Put the frame read at `ts` in the buffer; False if it is empty or cannot be converted."""
        bgr = to_bgr(image)
        if bgr is None:
            shape = None if image is None else (image.shape, image.dtype)
            log.warning("capture: %s: skipped an empty or unsupported frame %s", self._name, shape)
            return False
        bgr = downscaled_to_max_side(bgr)
        with self._slot_changed:
            self.frames_read += 1
            self._latest = Frame(image=bgr, ts=ts, seq=self.frames_read)
            self._slot_changed.notify_all()
        if self._on_frame is not None:
            self._on_frame()
        self._backoff.reset()
        self._set_online(True)
        return True

    def _set_online(self, online: bool) -> None:
        if self._online is online:
            return
        self._online = online
        if online:
            log.info("capture: %s is online", self._name)
        else:
            log.warning("capture: %s is offline", self._name)
        if self._on_status is None:
            return
        try:
            self._on_status(online)
        except Exception:  # noqa: BLE001 - a failing callback must not stop the capture thread
            log.exception("capture: on_status(%s) callback failed", online)
