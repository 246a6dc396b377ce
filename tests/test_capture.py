"""The camera reader on real sources: video files, images, a folder, a device path and an MJPEG camera."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time

import cv2
import numpy as np
import pytest

from edge_agent.capture import CameraReader, Frame, validate_source
from edge_agent.capture.reader import to_bgr
from edge_agent.config import CameraSettings
from edge_agent.errors import UserError
from tests.support.videos import solid, write_video

pytestmark = pytest.mark.timeout(30)

FAST = CameraSettings(
    loop=True,
    fps=10,
    open_timeout_s=2,
    read_timeout_s=1,
    stale_after_s=1,
    backoff_initial_s=0.1,
    backoff_max_s=0.4,
)


def settings(source: object, **changes: object) -> CameraSettings:
    return dataclasses.replace(FAST, source=str(source), **changes)


def collect(reader: CameraReader, count: int, wait_s: float = 5.0) -> list[Frame]:
    """The next `count` frames the reader hands out (fewer if it ends or stalls for `wait_s`)."""
    frames: list[Frame] = []
    seq = -1
    while len(frames) < count:
        frame = reader.latest(after_seq=seq, timeout=wait_s)
        if frame is None:
            break
        frames.append(frame)
        seq = frame.seq
    return frames


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def square_x(image: np.ndarray) -> int:
    """The left edge of the test pattern's white square."""
    bright_columns = np.flatnonzero(image[image.shape[0] // 2, :, 0] > 150)
    return int(bright_columns[0])


def test_video_file_frames_are_bgr_with_increasing_seq_and_the_time_they_were_read(run_reader, one_second_video):
    reader, statuses = run_reader(settings(one_second_video))
    frames = collect(reader, 5)

    assert len(frames) == 5
    assert all(f.image.dtype == np.uint8 and f.image.shape == (120, 160, 3) for f in frames)
    assert [f.seq for f in frames] == sorted({f.seq for f in frames})
    assert all(earlier.ts < later.ts <= time.time() for earlier, later in zip(frames, frames[1:]))
    assert reader.online and statuses == [True]


def test_a_looping_video_file_starts_again_at_its_end(run_reader, one_second_video):
    reader, _ = run_reader(settings(one_second_video))
    frames = collect(reader, 16)  # the file has 10 frames

    positions = [square_x(f.image) for f in frames]
    assert len(frames) == 16
    assert any(later < earlier for earlier, later in zip(positions, positions[1:])), positions
    assert reader.reopen_count == 0, "starting over is not a reopen after a failure"


def test_a_video_file_plays_at_its_own_rate_and_goes_offline_at_its_end(run_reader, four_second_video):
    reader, statuses = run_reader(settings(four_second_video, loop=False, fps=5))
    frames = collect(reader, 1000, wait_s=2)

    # 4 s of video kept at 5 fps is about 20 frames; read as fast as it decodes, it would be one or two.
    assert 14 <= len(frames) <= 24
    assert reader.frames_read == len(frames)
    assert wait_until(lambda: statuses == [True, False], timeout_s=2), statuses
    assert not reader.online


def test_latest_hands_out_only_newer_frames_and_keeps_just_the_newest(run_reader, one_second_video):
    reader, _ = run_reader(settings(one_second_video))
    first = reader.latest(timeout=5)
    assert first is not None

    time.sleep(1.0)  # about 10 frames arrive while nobody asks
    newest = reader.latest(after_seq=first.seq)
    assert newest.seq - first.seq >= 5, "frames in between were dropped, not queued"
    assert time.time() - newest.ts < 0.5
    following = reader.latest(after_seq=newest.seq, timeout=2)
    assert following.seq > newest.seq and following.ts > newest.ts


def test_latest_returns_none_when_nothing_newer_arrives_in_time(run_reader, media_dir):
    still = media_dir / "still_gray.png"
    cv2.imwrite(str(still), solid((90, 90, 90)))
    reader, _ = run_reader(settings(still, fps=1, stale_after_s=3))
    frame = reader.latest(timeout=5)

    assert reader.latest(after_seq=frame.seq) is None
    assert reader.latest(after_seq=frame.seq, timeout=0.2) is None


def test_an_image_file_is_a_still_camera_repeating_the_image_with_fresh_times(run_reader, media_dir):
    still = media_dir / "still_blue.jpg"
    cv2.imwrite(str(still), solid((255, 0, 0)))
    reader, _ = run_reader(settings(still))
    frames = collect(reader, 4)

    assert len(frames) == 4
    assert all(np.array_equal(f.image, frames[0].image) for f in frames)
    assert sorted({f.ts for f in frames}) == [f.ts for f in frames]


@pytest.mark.parametrize(
    ("name", "stored", "expected_bgr"),
    [
        ("gray.png", np.full((120, 160), 200, np.uint8), (200, 200, 200)),
        ("deep.png", np.full((120, 160, 3), 0x8000, np.uint16), (128, 128, 128)),
        ("alpha.png", np.full((120, 160, 4), (10, 20, 30, 0), np.uint8), (10, 20, 30)),
    ],
)
def test_gray_16_bit_and_transparent_images_become_8_bit_bgr(run_reader, tmp_path, name, stored, expected_bgr):
    cv2.imwrite(str(tmp_path / name), stored)
    reader, _ = run_reader(settings(tmp_path / name))
    frame = reader.latest(timeout=5)

    assert frame.image.dtype == np.uint8 and frame.image.shape == (120, 160, 3)
    assert tuple(frame.image[0, 0]) == expected_bgr


@pytest.mark.parametrize(
    "odd",
    [np.zeros((0, 0, 3), np.uint8), np.zeros((120, 160, 2), np.uint8), np.zeros((120, 160, 3), np.float32)],
    ids=["empty", "two-channel", "float"],
)
def test_frames_no_camera_produces_are_refused_rather_than_passed_on(odd):
    assert to_bgr(odd) is None


def test_a_failing_status_callback_does_not_stop_capture(one_second_video, caplog):
    def broken_callback(online: bool) -> None:
        raise RuntimeError("subscriber bug")

    reader = CameraReader(settings(one_second_video), on_status=broken_callback)
    reader.start()
    try:
        assert len(collect(reader, 3)) == 3
    finally:
        reader.stop()
    assert "on_status(True) callback failed" in caplog.text


def test_an_image_folder_plays_in_sorted_order_skipping_files_that_are_not_complete_images(
    run_reader, image_folder, caplog
):
    caplog.set_level(logging.WARNING)
    reader, _ = run_reader(settings(image_folder))
    frames = collect(reader, 5)

    colours = ["red" if f.image[0, 0, 2] > 200 else "green" if f.image[0, 0, 1] > 200 else "other" for f in frames]
    assert colours == ["red", "green", "red", "green", "red"]
    assert "c_truncated.jpg: skipped" in caplog.text
    assert "d_notes.txt" not in caplog.text, "only image suffixes are tried"


def test_a_video_deleted_while_playing_goes_offline_and_comes_back_when_recreated(run_reader, tmp_path):
    video = write_video(tmp_path / "camera.mp4", seconds=0.5, fps=10)
    reader, statuses = run_reader(settings(video))
    assert reader.latest(timeout=5) is not None

    parked = video.rename(tmp_path / "parked.mp4")
    assert wait_until(lambda: not reader.online, timeout_s=5)
    reopens_while_missing = reader.reopen_count
    time.sleep(1.0)
    assert 2 <= reader.reopen_count - reopens_while_missing <= 5, "retries back off (0.1, 0.2, 0.4, 0.4 s)"

    shutil.copy(parked, video)
    assert wait_until(lambda: statuses == [True, False, True], timeout_s=5), statuses


def test_a_stopped_mjpeg_camera_goes_offline_and_recovers_when_it_serves_again(run_reader, mjpeg_camera):
    reader, statuses = run_reader(settings(mjpeg_camera.url))
    assert len(collect(reader, 3)) == 3

    mjpeg_camera.stop()
    assert wait_until(lambda: not reader.online, timeout_s=5)
    mjpeg_camera.start()
    assert wait_until(lambda: statuses == [True, False, True], timeout_s=5), statuses
    assert reader.reopen_count >= 1


def test_a_stalled_mjpeg_camera_counts_as_offline_after_the_read_timeout(run_reader, mjpeg_camera):
    reader, statuses = run_reader(settings(mjpeg_camera.url, read_timeout_s=1))
    assert reader.latest(timeout=5) is not None

    mjpeg_camera.hang()
    assert wait_until(lambda: statuses == [True, False], timeout_s=4), statuses


def test_stop_ends_the_reader_promptly(one_second_video):
    reader = CameraReader(settings(one_second_video))
    reader.start()
    reader.latest(timeout=5)

    started = time.monotonic()
    reader.stop()
    assert reader.latest(after_seq=reader.frames_read, timeout=5) is None
    assert time.monotonic() - started < 2, "a waiting latest() returns once the reader has stopped"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/dev/video99", "/dev/video99 does not exist"),
        ("99", "/dev/video99 does not exist"),
        ("/no/such/clip.mp4", "/no/such/clip.mp4 does not exist"),
        ("ftp://camera.local/stream", "scheme 'ftp'"),
        ("rtsp:///stream", "names no host"),
    ],
)
def test_validate_source_names_the_problem(source, message):
    with pytest.raises(UserError, match="camera.source") as error:
        validate_source(settings(source))
    assert message in str(error.value)


def test_validate_source_rejects_a_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(UserError, match="holds no image files"):
        validate_source(settings(tmp_path))


def test_validate_source_accepts_files_folders_and_stream_urls(one_second_video, image_folder):
    for source in (one_second_video, image_folder, "rtsp://user:pw@10.0.0.5:554/stream1", "http://cam/video.mjpg"):
        validate_source(settings(source))
