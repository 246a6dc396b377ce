"""Frame sources: turn the configured `camera.source` string into something that yields raw images.

Every kind of source behaves like a camera: `grab()` blocks about as long as a camera would before its next
frame (a video file is paced by its own FPS, an image or a directory of images by `fps`), and `retrieve()`
returns that frame. The reader thread (`reader.py`) decides which frames to keep.

`validate_source` checks the source once at start-up and raises `UserError` for a mistake the user can fix;
at run time a source that cannot be opened raises `SourceUnavailable`, which the reader treats as offline.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import threading
import time
import urllib.parse
from typing import Protocol

import cv2
import numpy as np

from edge_agent.capture.headers import image_size
from edge_agent.config import CameraSettings
from edge_agent.errors import UserError
from edge_agent.redact import redact_url

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
DEVICE_PATH = re.compile(r"/dev/video(\d+)")
# Suffixes read as still images; anything else that is a file is opened as a video.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
JPEG_END_MARKER = b"\xff\xd9"
MAX_IMAGE_PIXELS = 50_000_000
"""Largest image file decoded: 8K frames (33 MP) and the largest ordinary camera photos (48 MP) pass, and
one decodes to at most 150 MB (8-bit BGR), where a 20000 x 20000 decompression bomb would take 1.2 GB."""
# FFmpeg options for RTSP (the variable replaces OpenCV's default, which is only `rtsp_transport;tcp`):
# TCP avoids UDP loss and a small probe opens the stream in well under a second.
RTSP_CAPTURE_OPTIONS = "rtsp_transport;tcp|analyzeduration;500000|probesize;32768"
# A read that took at least this share of the read timeout hit the timeout: FFmpeg then still hands out
# stale decoder frames, so the read counts as a failure.
STALLED_READ_SHARE = 0.9
# Frame rates a video file may declare; outside this the file's header is not believed and `fps` paces it.
PLAUSIBLE_FILE_FPS = (1.0, 240.0)


class SourceUnavailable(Exception):
    """The source cannot be opened right now (unplugged, deleted, server down): the reader retries."""


class SourceEnded(Exception):
    """A non-looping file or directory has played to its end."""


class Source(Protocol):
    """What the reader needs from a source."""

    def grab(self) -> bool:
        """Wait for the next frame like a camera would; False if the source failed.

        May raise `SourceUnavailable` (the source went away) or `SourceEnded` (played to its end).
        """

    def retrieve(self) -> np.ndarray | None:
        """The grabbed frame as decoded (any depth or channel count), or None if it cannot be decoded."""

    def close(self) -> None:
        """Release the device, stream or file."""


class Ticker:
    """Ticks every `interval_s` seconds on the monotonic clock, never bursting to catch up after a delay."""

    # A tick a little early still counts: frames paced by another clock at the same rate must not be
    # dropped for a jitter of a millisecond.
    EARLY_SHARE = 0.25

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic()

    def due(self) -> bool:
        """Whether a tick is due now; if so, consume it."""
        now = time.monotonic()
        if now < self._next - self.interval_s * self.EARLY_SHARE:
            return False
        self._advance(now)
        return True

    def wait(self, stopped: threading.Event) -> bool:
        """Sleep until the next tick and consume it; False if `stopped` was set meanwhile."""
        if stopped.wait(max(0.0, self._next - time.monotonic())):
            return False
        self._advance(time.monotonic())
        return True

    def _advance(self, now: float) -> None:
        self._next = max(self._next + self.interval_s, now)


def validate_source(settings: CameraSettings) -> None:
    """Raise `UserError` if `settings.source` cannot name a usable source on this machine.

    The config schema already refused an empty one."""
    source = settings.source_text
    if "://" in source:
        _validate_url(source)
    elif source.isdigit() or DEVICE_PATH.fullmatch(source):
        _validate_device(source)
    else:
        _validate_path(pathlib.Path(source))


def _validate_url(url: str) -> None:
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        raise UserError(f"camera.source: {shown!r} is not a valid URL ({error})") from None
    if parts.scheme.lower() not in STREAM_SCHEMES:
        schemes = ", ".join(STREAM_SCHEMES)
        raise UserError(f"camera.source: {shown!r} has scheme {parts.scheme!r}; use one of {schemes}")
    if not parts.hostname:
        raise UserError(f"camera.source: {shown!r} names no host")


class DeviceMissing(UserError):
    """The camera device node is absent: a USB camera may simply not be plugged in yet."""


def _validate_device(source: str) -> None:
    path = pathlib.Path(device_path(source))
    if not path.exists():
        raise DeviceMissing(f"camera.source: camera device {path} does not exist (is the camera plugged in?)")
    if not path.is_char_device():
        raise UserError(f"camera.source: {path} is not a camera device")


def _validate_path(path: pathlib.Path) -> None:
    if not path.exists():
        raise UserError(f"camera.source: {path} does not exist")
    if path.is_dir() and not image_files(path):
        raise UserError(f"camera.source: folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not os.access(path, os.R_OK):
        raise UserError(f"camera.source: {path} is not readable by this user")


def device_path(source: str) -> str:
    """`/dev/videoN` for a V4L2 index or device path."""
    return f"/dev/video{source}" if source.isdigit() else source


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The files in `folder` with an image suffix, in sorted order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_source(settings: CameraSettings, stopped: threading.Event) -> Source:
    """Open the configured source; raise `SourceUnavailable` if it cannot be opened now.

    `stopped` interrupts the pacing of file and image sources so the reader can stop promptly.
    """
    source = settings.source_text
    if "://" in source:
        return StreamSource(source, settings)
    if source.isdigit() or DEVICE_PATH.fullmatch(source):
        return DeviceSource(source, settings)
    path = pathlib.Path(source)
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFolderSource(path, settings, stopped)
    return VideoFileSource(path, settings, stopped)


class CaptureSource:
    """A live camera or stream read through `cv2.VideoCapture`; paced by the camera itself."""

    def __init__(self, capture: cv2.VideoCapture, name: str, read_timeout_s: float) -> None:
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable(f"cannot open {name}")
        self._capture = capture
        self._name = name
        self._read_timeout_s = read_timeout_s

    def grab(self) -> bool:
        started = time.monotonic()
        grabbed = self._capture.grab()
        took = time.monotonic() - started
        if grabbed and took >= self._read_timeout_s * STALLED_READ_SHARE:
            log.warning(
                "%s: a read took %.1f s (read timeout %.1f s); treating the stream as stalled",
                self._name,
                took,
                self._read_timeout_s,
            )
            return False
        return grabbed

    def retrieve(self) -> np.ndarray | None:
        retrieved, image = self._capture.retrieve()
        return image if retrieved else None

    def close(self) -> None:
        self._capture.release()


class StreamSource(CaptureSource):
    """An RTSP or HTTP(S) stream through FFmpeg, with the open and read timeouts applied at open."""

    def __init__(self, url: str, settings: CameraSettings) -> None:
        if url.lower().startswith("rtsp"):
            use_rtsp_over_tcp()
        timeouts = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            round(settings.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            round(settings.read_timeout_s * 1000),
        ]
        super().__init__(cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeouts), redact_url(url), settings.read_timeout_s)


class DeviceSource(CaptureSource):
    """A V4L2 camera (the driver's own select() timeout bounds a read; no timeout parameters at open)."""

    def __init__(self, source: str, settings: CameraSettings) -> None:
        path = device_path(source)
        super().__init__(cv2.VideoCapture(path, cv2.CAP_V4L2), path, settings.read_timeout_s)


def use_rtsp_over_tcp() -> None:
    """Set FFmpeg's RTSP options for OpenCV, keeping the user's own options but always `rtsp_transport`."""
    current = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
    if current is None:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = RTSP_CAPTURE_OPTIONS
    elif "rtsp_transport" not in current:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;tcp|{current}"


class VideoFileSource:
    """A video file played at its own frame rate, reopened at its end when looping.

    Reopening (rather than seeking) notices a file that was deleted or replaced while it played.
    """

    def __init__(self, path: pathlib.Path, settings: CameraSettings, stopped: threading.Event) -> None:
        self._path = path
        self._loop = settings.loop
        self._stopped = stopped
        self._capture = self._open()
        file_fps = self._capture.get(cv2.CAP_PROP_FPS)
        low, high = PLAUSIBLE_FILE_FPS
        self._ticker = Ticker(1.0 / (file_fps if low <= file_fps <= high else settings.fps))

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self._path), cv2.CAP_ANY)
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable(f"cannot open video file {self._path}")
        return capture

    def grab(self) -> bool:
        if not self._ticker.wait(self._stopped):
            return False
        if self._capture.grab():
            return True
        if not self._loop:
            raise SourceEnded(str(self._path))
        self._capture.release()
        self._capture = self._open()
        return self._capture.grab()

    def retrieve(self) -> np.ndarray | None:
        retrieved, image = self._capture.retrieve()
        return image if retrieved else None

    def close(self) -> None:
        self._capture.release()


class ImageFolderSource:
    """A still camera: one image file, or the images of a folder in sorted order, played at `fps`.

    Files that do not decode (truncated, not an image, too large) are skipped with a log line; the folder is listed
    again at each pass, so images added or removed while running are picked up.
    """

    def __init__(self, path: pathlib.Path, settings: CameraSettings, stopped: threading.Event) -> None:
        self._path = path
        self._loop = settings.loop or not path.is_dir()
        self._stopped = stopped
        self._ticker = Ticker(1.0 / settings.fps)
        self._pending: list[pathlib.Path] = self._list()
        self._image: np.ndarray | None = None

    def _list(self) -> list[pathlib.Path]:
        try:
            files = image_files(self._path) if self._path.is_dir() else [self._path]
        except OSError as error:
            raise SourceUnavailable(f"cannot list {self._path}: {error}") from error
        if not files or not files[0].is_file():
            raise SourceUnavailable(f"no image files at {self._path}")
        return files

    def grab(self) -> bool:
        if not self._ticker.wait(self._stopped):
            return False
        self._image = self._decode_next()
        if self._image is None:
            if not self._loop:
                raise SourceEnded(str(self._path))
            self._pending = self._list()
            self._image = self._decode_next()
        return self._image is not None

    def _decode_next(self) -> np.ndarray | None:
        """The next pending image that decodes, or None when this pass has no more."""
        while self._pending:
            path = self._pending.pop(0)
            try:
                return decode_image(path)
            except UnusableImage as problem:
                log.warning("%s: skipped, %s", path, problem)
        return None

    def retrieve(self) -> np.ndarray | None:
        return self._image

    def close(self) -> None:
        self._pending = []


class UnusableImage(Exception):
    """An image file that cannot be played; the message says why (`it is not a complete image`)."""


def decode_image(path: pathlib.Path) -> np.ndarray:
    """The image in `path` as stored (any depth and channels); `UnusableImage` if it cannot be used.

    The size is read from the header first, so a decompression bomb is never decoded, and a file whose
    header is no format `image_size` reads is not decoded either (OpenCV would pick a decoder by content).
    A JPEG without its end marker (still being written, or cut short) is incomplete: OpenCV would decode
    it anyway, padding the missing part with gray.
    """
    incomplete = UnusableImage("it is not a complete image")
    try:
        data = path.read_bytes()
    except OSError:
        raise incomplete from None
    size = image_size(data)
    if not size or not all(size):
        raise incomplete
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        limit = f"{MAX_IMAGE_PIXELS / 1e6:g} MP"
        raise UnusableImage(f"{width} x {height} pixels is more than the {limit} an image may have")
    if path.suffix.lower() in JPEG_SUFFIXES and not data.rstrip(b"\0").endswith(JPEG_END_MARKER):
        raise incomplete
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV raises, rather than returning None, on some broken files
        raise incomplete from None
    if image is None or not image.size:
        raise incomplete
    return image
