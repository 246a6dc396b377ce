"""Capture inputs that used to leak secrets or memory: credentials in camera URLs, decompression bombs."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest

from edge_agent.capture import CameraReader, validate_source
from edge_agent.capture.headers import image_size
from edge_agent.config import CameraSettings, parse_config
from edge_agent.errors import UserError
from tests.test_config import MINIMAL

pytestmark = pytest.mark.timeout(60)

SECRETS = ("hunter2", "T0KEN", "s3cret", "k3y", "0auth")
RETRYING = CameraSettings(
    loop=True, fps=5, open_timeout_s=1, read_timeout_s=1, stale_after_s=1.5, backoff_initial_s=0.05, backoff_max_s=0.1
)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_hidden(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("rtsp://admin:hunter2@127.0.0.1:{port}/live/main?token=T0KEN", "/live/main"),
        ("http://T0KEN@127.0.0.1:{port}/video.mjpg?user=admin&pwd=s3cret", "/video.mjpg"),
        ("https://127.0.0.1:{port}/cam/snapshot?key=k3y&auth=0auth&channel=1", "/cam/snapshot"),
    ],
)
def test_credentials_in_a_failing_stream_url_never_reach_the_log(url, path, caplog, capfd):
    reader = CameraReader(dataclasses.replace(RETRYING, source=url.format(port=closed_port())))
    reader.start()
    deadline = time.monotonic() + 10
    while reader.reopen_count < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.stop()

    assert reader.reopen_count >= 3
    assert "cannot open" in caplog.text and "is offline" in caplog.text
    assert "127.0.0.1:" in caplog.text and path in caplog.text
    assert_hidden(caplog.text)
    assert_hidden(capfd.readouterr().err)  # FFmpeg's and OpenCV's own lines


@pytest.mark.parametrize(
    "url",
    [
        "ftp://admin:hunter2@cam.example/live/main?token=T0KEN",
        "rtsp://admin:hunter2@:554/live/main?password=s3cret",
        "rtsps://T0KEN@/live/main",
        "http://admin:hunter2@[::1/live/main?token=T0KEN",
    ],
)
def test_an_unusable_camera_url_is_named_without_its_credentials(url):
    with pytest.raises(UserError) as caught:
        validate_source(dataclasses.replace(RETRYING, source=url))

    message = str(caught.value)
    assert message.startswith("camera.source: ") and "/live/main" in message
    assert_hidden(message)


# -- decompression bombs ---------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(width: int, height: int) -> bytes:
    """A black RGB PNG, compressed row by row so that no full image is ever held in memory."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width * 3)  # filter byte 0, then black pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims `width` x `height` (libjpeg would allocate for that)."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """20000 x 20000 pixels (1.2 GB decoded) in about 1.2 MB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(flat_png(20000, 20000))
    return path


PLAY_FOLDER = """
import json, logging, pathlib, resource, sys, threading
from edge_agent.config import CameraSettings
from edge_agent.capture.sources import ImageFolderSource, SourceEnded
logging.basicConfig(level=logging.WARNING)
folder = pathlib.Path(sys.argv[1])
settings = CameraSettings(source=str(folder), loop=False, fps=50, open_timeout_s=1, read_timeout_s=1,
                          stale_after_s=1, backoff_initial_s=0.1, backoff_max_s=0.1)
source = ImageFolderSource(folder, settings, threading.Event())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shapes = []
try:
    while True:
        if source.grab():
            shapes.append(list(source.retrieve().shape))
except SourceEnded:
    pass
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"shapes": shapes, "growth_mib": growth_kib / 1024}))
"""


@pytest.mark.parametrize("bomb", ["png", "jpeg"])
def test_an_image_folder_skips_a_decompression_bomb_and_plays_the_good_images(tmp_path, bomb_png, bomb):
    """Run in a child process so its peak RSS measures only the folder being played."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((120, 160, 3), 50, np.uint8))
    bomb_path = tmp_path / f"b.{bomb}"
    bomb_path.write_bytes(bomb_png.read_bytes() if bomb == "png" else jpeg_claiming(20000, 20000))
    cv2.imwrite(str(tmp_path / "c.jpg"), np.full((120, 160, 3), 200, np.uint8))

    result = subprocess.run(
        [sys.executable, "-c", PLAY_FOLDER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    played = json.loads(result.stdout)
    assert played["shapes"] == [[120, 160, 3], [120, 160, 3]]
    assert played["growth_mib"] < 100, played
    assert f"{bomb_path}: skipped, 20000 x 20000 pixels is more than the 50 MP an image may have" in result.stderr


@pytest.mark.parametrize(
    ("suffix", "channels"),
    [
        *((suffix, channels) for suffix in (".png", ".jpg", ".bmp", ".webp", ".tiff") for channels in (1, 3)),
        (".pgm", 1),
        (".ppm", 3),
    ],
)
def test_image_sizes_are_read_from_the_header_of_every_accepted_format(suffix, channels):
    image = np.zeros((37, 53, channels), np.uint8)
    data = cv2.imencode(suffix, image)[1].tobytes()

    assert image_size(data) == (53, 37)


def test_a_file_with_no_image_header_this_agent_reads_has_no_size():
    assert image_size(b"GIF89a" + bytes(20)) is None
    assert image_size(b"") is None


@pytest.mark.parametrize("size", [257, 20000])
def test_a_scene_gate_larger_than_its_purpose_is_refused_at_load(size):
    with pytest.raises(UserError, match=r"^config.yaml: scene_gate.size: must be between 1 and 256 pixels "):
        parse_config({**MINIMAL, "scene_gate": {"size": size}})
