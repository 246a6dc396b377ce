"""Real media for capture tests: video files written with cv2.VideoWriter, images, and an MJPEG HTTP camera.

Frames show a bright square on a dark background whose position encodes the frame number, so a test can
tell frames apart by looking at them.
"""

from __future__ import annotations

import http.server
import pathlib
import socketserver
import threading
import time

import cv2
import numpy as np
import pytest

from edge_agent.capture import CameraReader
from edge_agent.config import CameraSettings

FRAME_SIZE = (160, 120)  # width, height: small, so writing and decoding cost little on a shared CPU
SQUARE = 20


def pattern(index: int, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A BGR frame with a white square whose x position steps with `index`."""
    width, height = size
    image = np.full((height, width, 3), 40, np.uint8)
    x = (index * 7) % (width - SQUARE)
    image[height // 2 - SQUARE // 2 : height // 2 + SQUARE // 2, x : x + SQUARE] = 255
    return image


def write_video(path: pathlib.Path, seconds: float, fps: float) -> pathlib.Path:
    """Write an MPEG-4 file of `seconds` at `fps` frames per second showing the moving square."""
    width, height = FRAME_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), f"cv2.VideoWriter cannot write {path}"
    for index in range(round(seconds * fps)):
        writer.write(pattern(index))
    writer.release()
    return path


def solid(bgr: tuple[int, int, int]) -> np.ndarray:
    """A frame of one colour, easy to recognise after JPEG compression."""
    width, height = FRAME_SIZE
    return np.full((height, width, 3), bgr, np.uint8)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def one_second_video(media_dir: pathlib.Path) -> pathlib.Path:
    """1 s at 10 fps: 10 frames."""
    return write_video(media_dir / "one_second.mp4", seconds=1, fps=10)


@pytest.fixture(scope="session")
def four_second_video(media_dir: pathlib.Path) -> pathlib.Path:
    """4 s at 25 fps: 100 frames, enough to see pacing."""
    return write_video(media_dir / "four_seconds.mp4", seconds=4, fps=25)


@pytest.fixture(scope="session")
def image_folder(media_dir: pathlib.Path) -> pathlib.Path:
    """A folder with a red JPEG, a green PNG, a JPEG cut short (as while still being written) and a text
    file, in that sorted order."""
    folder = media_dir / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a_red.jpg"), solid((0, 0, 255)))
    cv2.imwrite(str(folder / "b_green.png"), solid((0, 255, 0)))
    complete = cv2.imencode(".jpg", solid((255, 0, 0)))[1].tobytes()
    (folder / "c_truncated.jpg").write_bytes(complete[:-10])
    (folder / "d_notes.txt").write_text("not an image\n")
    return folder


class MjpegCamera:
    """An IP camera on 127.0.0.1: `GET /video.mjpg` streams the moving square as multipart MJPEG.

    `stop()` closes the server and every stream (clients see the end of the stream); `start()` serves
    again on the same port; `hang()` keeps the connections open but stops sending, like a stalled camera.
    """

    BOUNDARY = "frame"

    def __init__(self, fps: float = 10) -> None:
        self.fps = fps
        self.port = 0
        self._serving = threading.Event()
        self._hung = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._serving.set()
        self._hung.clear()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self._serving.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def hang(self) -> None:
        self._hung.set()

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={camera.BOUNDARY}")
                self.end_headers()
                try:
                    camera._stream(self.wfile)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                """Quiet: test output shows only what fails."""

        return Handler

    def _stream(self, out) -> None:
        index = 0
        while self._serving.is_set():
            if not self._hung.is_set():
                jpeg = cv2.imencode(".jpg", pattern(index))[1].tobytes()
                out.write(
                    f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                    + jpeg
                    + b"\r\n"
                )
                out.flush()
                index += 1
            time.sleep(1 / self.fps)


@pytest.fixture
def mjpeg_camera():
    camera = MjpegCamera()
    camera.start()
    yield camera
    camera.stop()


@pytest.fixture
def run_reader():
    """Start a reader (and its status log) for a test, and always stop it afterwards."""
    readers: list[CameraReader] = []

    def start(capture: CameraSettings) -> tuple[CameraReader, list[bool]]:
        statuses: list[bool] = []
        reader = CameraReader(capture, on_status=statuses.append)
        readers.append(reader)
        reader.start()
        return reader, statuses

    yield start
    for reader in readers:
        reader.stop()
