"""The demo model seeing for real, end to end: a generated video whose truth changes at known times, read by
OpenCV, gated, answered by the INT8 export, published on a real broker: the answers follow the truth."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from edge_agent.devtools.demo import DEMO_MODEL, demo_config, room_of, truth_of, write_demo_video
from edge_agent.devtools.loopback import BrokerAddress
from tests.support.agent import RunningAgent
from tests.support.broker import wait_until

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = REPO / DEMO_MODEL
STORY_SECONDS = 16.0  # eight moments of two seconds each
CAMERA_FPS = 4.0
SETTLE_S = 1.0  # "within a few frames": four frames at CAMERA_FPS
FOLLOWED = ("door_open", "people", "bag", "right_door_open")
"""Questions about the left room, and the right room's door: each on its room's region of the wide frame."""


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    video, stories = write_demo_video(tmp_path_factory.mktemp("demo") / "story.mp4", STORY_SECONDS)
    return stories, video


def changes_of(timeline, question_id: str) -> list[tuple[float, object]]:
    """(time, new truth) for every moment where the truth of `question_id` changes, the start included."""
    changes, last = [], object()
    for moment in timeline:
        truth = truth_of(question_id, moment.scene)
        if truth != last:
            changes.append((moment.start, truth))
            last = truth
    return changes


def test_published_answers_follow_the_truth_within_a_few_frames_of_each_change(story, broker, subscriber):
    stories, video = story
    listener = subscriber(broker, "edge-agent/demo/answers/#")
    config = demo_config(MODEL, video, BrokerAddress(broker.host, broker.port, "5", "mosquitto"))
    config["camera"].update(fps=CAMERA_FPS, loop=False)
    config["questions"] = [dict(q, every=0.25) for q in config["questions"]]
    with RunningAgent(config) as agent:
        wait_until(
            lambda: (
                _last_frame_ts(listener) is not None
                and agent.metrics.frames._value.get() >= STORY_SECONDS * CAMERA_FPS - 4
            ),
            timeout=STORY_SECONDS + 30,
            what="the whole story",
        )
    answers = [json.loads(m.payload) for m in listener.messages]
    start = min(a["frame_ts"] for a in answers)  # the first frame is the video's time zero
    for question_id in FOLLOWED:
        published = sorted((a["frame_ts"] - start, a["value"]) for a in answers if a["question_id"] == question_id)
        for change_time, truth in changes_of(stories[room_of(question_id)], question_id):
            settled = [value for t, value in published if t <= change_time + SETTLE_S]
            assert settled and settled[-1] == truth, (
                f"{question_id}: at {change_time:.1f} s the truth became {truth!r}; published by "
                f"{change_time + SETTLE_S:.1f} s: {published}"
            )


def _last_frame_ts(listener):
    stamps = [json.loads(m.payload)["frame_ts"] for m in listener.messages]
    return max(stamps) if stamps else None


def test_edge_agent_demo_prints_answers_beside_the_truth_and_stops_after_its_duration():
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", "--duration", "12", "--video-seconds", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[video")]
    assert any("Is the door open? (left room)" in line for line in lines)
    assert any("Is the door open? (right room)" in line for line in lines)
    assert sum(line.endswith("ok") for line in lines) >= len(lines) * 0.8, result.stdout
    assert "mosquitto listening on 127.0.0.1" in result.stderr
    assert "right_door_open [0.5, 0.0, 1.0, 1.0]" in result.stderr
    assert "the image behind each answer (its region, JPEG, retained): edge-agent/demo/evidence/" in result.stderr
    assert re.search(r"status page: http://127\.0\.0\.1:[1-9][0-9]*/", result.stderr)


def test_without_mosquitto_the_demo_runs_on_an_embedded_amqtt_broker(monkeypatch, capsys):
    import edge_agent.devtools.demo as demo
    import edge_agent.devtools.loopback as loopback

    monkeypatch.setattr(loopback.shutil, "which", lambda name: None)
    monkeypatch.setattr(loopback, "MOSQUITTO_PATHS", ())
    assert demo.run_demo(duration_s=10, model=None, video_seconds=8) == 0
    captured = capsys.readouterr()
    assert "embedded amqtt listening on 127.0.0.1" in captured.err and "(MQTT 3.1.1)" in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("[video")]
    assert lines and sum(line.endswith("ok") for line in lines) >= len(lines) * 0.8, captured.out
