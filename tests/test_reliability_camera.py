"""Camera faults and odd frames: the camera goes offline, reopening backs off, answers resume, and `frame_ts`
stays honest (no frame from before or during an outage is ever handed out or published as new).

Sources are real: GStreamer's RTSP server and an MJPEG server on loopback, video files and image folders
written by the test; answers go through the real agent with the tiny model to a real mosquitto.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from edge_agent.capture import CameraReader
from edge_agent.config import CameraSettings
from edge_agent.service import Agent
from tests.support.agent import QUESTIONS, RunningAgent, agent_config, topic
from tests.support.broker import wait_until
from tests.support.videos import pattern, write_video

pytestmark = pytest.mark.timeout(120)

FAST = CameraSettings(
    loop=True, fps=10, open_timeout_s=1, read_timeout_s=1, stale_after_s=1.5, backoff_initial_s=0.2, backoff_max_s=0.8
)
"""Short timeouts and backoff, so each fault is noticed and retried within seconds."""
FAST_CAMERA = {
    "fps": 5,
    "open_timeout_s": 1,
    "read_timeout_s": 1,
    "stale_after_s": 1.5,
    "backoff_initial_s": 0.2,
    "backoff_max_s": 0.8,
}
"""The same, as the agent's `camera:` config section (answers are slower, so fewer frames are sampled)."""
IN_TRANSIT_S = 0.5
"""Frames already on their way when a camera hangs may still arrive up to this long after it."""


def reader_settings(source: object, **changes: object) -> CameraSettings:
    return dataclasses.replace(FAST, source=str(source), **changes)


def reopens_during(reader: CameraReader, seconds: float) -> int:
    before = reader.reopen_count
    time.sleep(seconds)
    return reader.reopen_count - before


# -- the reader on its own -------------------------------------------------------------------------------


def test_a_stopped_rtsp_camera_goes_offline_retries_with_backoff_and_recovers_with_fresh_frames(
    run_reader, rtsp_camera
):
    reader, statuses = run_reader(reader_settings(rtsp_camera.url))
    assert reader.latest(timeout=10) is not None

    rtsp_camera.stop()
    wait_until(lambda: not reader.online, timeout=5, what="offline after the server stopped")
    # Waits of 0.2, 0.4, 0.8, 0.8 s: about 3 attempts in 2 s, where retrying at once would make hundreds.
    assert 1 <= reopens_during(reader, 2.0) <= 5

    back = time.time()
    rtsp_camera.start()
    wait_until(lambda: reader.online, timeout=10, what="online after the server came back")
    assert reader.latest(timeout=5).ts >= back
    wait_until(lambda: statuses == [True, False, True], timeout=5, what="statuses online, offline, online reported")


def test_a_hung_rtsp_camera_goes_offline_without_handing_out_its_stale_frames_as_new(run_reader, rtsp_camera):
    reader, statuses = run_reader(reader_settings(rtsp_camera.url))
    assert reader.latest(timeout=10) is not None

    hung = time.time()
    rtsp_camera.hang()
    wait_until(lambda: not reader.online, timeout=5, what="offline after the server hung")
    time.sleep(2.5)  # FFmpeg returns decoder frames after each timed-out read: none may be kept
    assert reader.latest().ts <= hung + IN_TRANSIT_S

    resumed = time.time()
    rtsp_camera.resume()
    wait_until(lambda: reader.online, timeout=10, what="online after the server resumed")
    assert reader.latest(timeout=5).ts >= resumed
    wait_until(lambda: statuses == [True, False, True], timeout=5, what="statuses online, offline, online reported")


def test_a_camera_device_that_does_not_exist_stays_offline_and_is_retried_with_backoff(run_reader):
    reader, statuses = run_reader(reader_settings("/dev/video99"))
    wait_until(lambda: statuses == [False], timeout=5, what="reported offline")

    assert 1 <= reopens_during(reader, 2.0) <= 5
    assert reader.latest() is None and statuses == [False]


def test_the_agent_starts_with_an_unplugged_camera_device_offline_and_keeps_trying(
    broker, subscriber, tiny_llava_int8, tiny_engine, caplog
):
    listener = subscriber(broker, topic("camera"), topic("availability"))
    config = agent_config(tiny_llava_int8, broker, "/dev/video99")
    with (
        caplog.at_level(logging.WARNING, logger="edge_agent.service"),
        RunningAgent(config, engine=tiny_engine) as agent,
    ):
        wait_until(
            lambda: [m.payload for m in listener.on(topic("camera"))][-1:] == [b"offline"], what="camera offline"
        )
        wait_until(lambda: agent._feeds[0].reader.reopen_count >= 1, what="a reopen attempt")
        assert listener.on(topic("availability"))[-1].payload == b"online"
    assert (
        "camera device /dev/video99 does not exist (is the camera plugged in?); starting with the camera "
        "offline" in caplog.text
    )


def test_frames_larger_than_the_model_can_use_are_downscaled_as_they_are_kept(run_reader, tmp_path):
    huge = tmp_path / "huge.png"
    cv2.imwrite(str(huge), np.full((4320, 7680, 3), 90, np.uint8))
    reader, _ = run_reader(reader_settings(huge, fps=2))

    assert reader.latest(timeout=10).image.shape == (1080, 1920, 3)


# -- through the agent -----------------------------------------------------------------------------------


class AnswerLog:
    """The answers and camera statuses the agent publishes, as seen by a subscriber."""

    def __init__(self, subscriber, broker):
        self._listener = subscriber(broker, topic("answers", "+"), topic("camera"))

    def answers(self, since: float = 0.0) -> list[dict]:
        """Every answer published with `answered_ts` at or after `since`."""
        payloads = [json.loads(m.payload) for m in self._listener.messages if "/answers/" in m.topic]
        return [p for p in payloads if p["answered_ts"] >= since]

    def camera(self) -> list[bytes]:
        return [m.payload for m in self._listener.on(topic("camera"))]

    def wait_for_camera(self, status: bytes, timeout: float = 15) -> float:
        """Wait until the camera's last published status is `status`; return when that was seen."""
        wait_until(lambda: self.camera()[-1:] == [status], timeout=timeout, what=f"camera {status.decode()}")
        return time.time()

    def wait_for_answer(self, since: float, timeout: float = 30) -> None:
        wait_until(lambda: self.answers(since), timeout=timeout, what="an answer")


def camera_config(model, broker, source) -> dict:
    """The agent on `source` with fast fault handling, republishing unchanged answers every half second."""
    return agent_config(model, broker, source, camera=FAST_CAMERA, mqtt={"heartbeat_s": 0.5})


def wait_until_offline(log: AnswerLog, agent: Agent) -> float:
    """Wait for the camera to be published offline, check the metric agrees, and return when it was seen."""
    seen = log.wait_for_camera(b"offline")
    assert agent.metrics.camera_up._value.get() == 0
    return seen


def assert_it_recovers_honestly(log: AnswerLog, agent: Agent, lost: float, restore) -> None:
    """Call `restore()`, then check: online again, nothing answered on frames from the outage (which
    began at `lost`), and every answer made after the restore is on a frame taken after it."""
    back = time.time()
    restore()
    log.wait_for_camera(b"online")
    during = [a for a in log.answers(since=lost) if a["answered_ts"] < back]
    assert all(a["frame_ts"] <= lost + IN_TRANSIT_S for a in during), during
    log.wait_for_answer(since=back)
    after = log.answers(since=back)
    assert all(a["frame_ts"] >= back for a in after), after
    assert agent.metrics.camera_up._value.get() == 1


def test_the_agent_reports_a_hung_rtsp_camera_offline_and_answers_again_only_on_frames_from_after_it_returns(
    tiny_llava_int8, tiny_engine, broker, subscriber, rtsp_camera
):
    log = AnswerLog(subscriber, broker)
    with RunningAgent(camera_config(tiny_llava_int8, broker, rtsp_camera.url), engine=tiny_engine) as agent:
        log.wait_for_camera(b"online")
        log.wait_for_answer(since=0)

        lost = time.time()
        rtsp_camera.hang()
        wait_until_offline(log, agent)
        time.sleep(2.5)  # the timed-out reads that return stale frames
        assert_it_recovers_honestly(log, agent, lost, rtsp_camera.resume)


def test_the_agent_reports_a_stalled_then_restarted_mjpeg_camera_and_answers_on_fresh_frames(
    tiny_llava_int8, tiny_engine, broker, subscriber, mjpeg_camera
):
    log = AnswerLog(subscriber, broker)
    with RunningAgent(camera_config(tiny_llava_int8, broker, mjpeg_camera.url), engine=tiny_engine) as agent:
        log.wait_for_answer(since=0)

        lost = time.time()
        mjpeg_camera.hang()  # the connection stays open, nothing more is sent
        wait_until_offline(log, agent)
        mjpeg_camera.stop()
        assert_it_recovers_honestly(log, agent, lost, mjpeg_camera.start)


def test_the_agent_reports_a_vanished_video_file_offline_and_answers_again_once_it_is_back(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    video = write_video(tmp_path / "camera.mp4", seconds=1, fps=10)
    log = AnswerLog(subscriber, broker)
    with RunningAgent(camera_config(tiny_llava_int8, broker, video), engine=tiny_engine) as agent:
        log.wait_for_answer(since=0)

        parked = video.rename(tmp_path / "parked.mp4")  # the open file plays on to its end, then is gone
        lost = wait_until_offline(log, agent)
        assert_it_recovers_honestly(log, agent, lost, lambda: parked.rename(video))


# -- odd frames ------------------------------------------------------------------------------------------


class RecordingEngine:
    """The real engine, remembering the shape of every frame it was asked to encode."""

    def __init__(self, engine):
        self._engine = engine
        self.name = engine.name
        self.encoded_shapes: list[tuple[int, ...]] = []

    def encode_views(self, images):
        self.encoded_shapes += [image.shape for image in images]
        return self._engine.encode_views(images)

    def answer(self, context, prompts):
        return self._engine.answer(context, prompts)

    def __getattr__(self, name):  # everything else (token counts, the tokenizer) as the real engine has it
        return getattr(self._engine, name)


ODD_IMAGES = {
    "a_gray.png": np.full((120, 160), 200, np.uint8),
    "b_transparent.png": np.full((120, 160, 4), (10, 20, 30, 0), np.uint8),
    "c_deep.png": np.full((120, 160, 3), 0x2000, np.uint16),
    "d_tiny.png": np.full((8, 8, 3), 250, np.uint8),
    "e_huge.png": np.tile(pattern(0), (36, 48, 1)),  # 7680 x 4320
}


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (OpenCV refuses absurd sizes by raising)."""
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))
    return bytes(png)


BROKEN_FILES = {
    "f_empty.png": b"",
    "g_truncated.jpg": cv2.imencode(".jpg", pattern(1))[1].tobytes()[:-100],
    "h_not_an_image.jpg": b"meeting notes, not a picture\n",
    "i_absurd_size.png": png_claiming(60000, 60000),
}


def test_odd_frames_are_converted_or_skipped_with_a_log_line_and_the_agent_answers_on_every_usable_one(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in ODD_IMAGES.items():
        cv2.imwrite(str(folder / name), image)
    for name, data in BROKEN_FILES.items():
        (folder / name).write_bytes(data)
    engine = RecordingEngine(tiny_engine)
    log = AnswerLog(subscriber, broker)
    # Questions due on every frame, so whether a frame is encoded depends only on the frame itself.
    config = agent_config(
        tiny_llava_int8,
        broker,
        folder,
        camera={"fps": 2, "loop": True},
        questions=[dict(question, every=0.05) for question in QUESTIONS],
    )

    with RunningAgent(config, engine=engine):
        expected = {(120, 160, 3), (8, 8, 3), (1080, 1920, 3)}
        wait_until(lambda: expected <= set(engine.encoded_shapes), timeout=60, what=f"frames {expected} encoded")
        wait_until(lambda: len(log.answers()) >= len(QUESTIONS), timeout=30, what="answers")
        # The broken files come after the usable ones, so the answers can be in before they are read.
        skipped = [f"{name}: skipped, it is not a complete image" for name in BROKEN_FILES if "absurd" not in name]
        skipped.append("i_absurd_size.png: skipped, 60000 x 60000 pixels is more than the 50 MP an image may have")
        wait_until(
            lambda: all(line in caplog.text for line in skipped), timeout=30, what="a log line for each broken file"
        )
