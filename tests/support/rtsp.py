"""A real RTSP camera on loopback: GStreamer's RTSP server (tests/support/_rtsp_server.py) in its own process.

Fixture `rtsp_camera`: a started `RtspCamera`, killed at teardown. The camera can be stopped and started
again on the same port, and hung with SIGSTOP (its sockets stay open but nothing is sent) and resumed.
The server runs under Debian's `/usr/bin/python3`, which has GStreamer's introspection bindings
(`scripts/test.sh` installs the Debian packages).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess

import pytest

from tests.support.broker import free_port

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = pathlib.Path(__file__).with_name("_rtsp_server.py")


class RtspCamera:
    """An IP camera at `url` streaming H.264 over RTSP, 10 frames a second: a moving ball, or the still `image`
    at `size` (width, height)."""

    def __init__(self, image: pathlib.Path | None = None, size: tuple[int, int] = (160, 120)) -> None:
        self.port = free_port()
        self._process: subprocess.Popen | None = None
        self._shows = ["--image", str(image)] if image else []
        self._size = ["--width", str(size[0]), "--height", str(size[1])]

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/camera"

    def start(self) -> None:
        """Serve (again) on the same port; returns once the server listens."""
        self._process = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port), *self._shows, *self._size],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._process.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the RTSP server did not start (is gir1.2-gst-rtsp-server-1.0 installed?): {line!r}")

    def stop(self) -> None:
        """Kill the server: every client sees its connection closed."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGCONT)  # a hung server must be able to die
        self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._process = None

    def hang(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but no frame and no reply is sent."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a hung server run again (SIGCONT)."""
        self._process.send_signal(signal.SIGCONT)


@pytest.fixture
def rtsp_camera():
    camera = RtspCamera()
    camera.start()
    yield camera
    camera.stop()
