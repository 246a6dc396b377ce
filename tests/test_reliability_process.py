"""Hangs and crashes of the agent process: what systemd and MQTT subscribers see.

A stalled inference withholds the watchdog pings (so systemd restarts the service); SIGTERM publishes
`offline` and exits within the unit's `TimeoutStopSec` even while the camera hangs; after SIGKILL and a
restart the retained state (availability, camera, every answer) is correct again.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.support.agent import QUESTIONS, RunningAgent, agent_config, topic, write_config
from tests.support.broker import wait_until
from tests.support.videos import write_video

pytestmark = pytest.mark.timeout(180)

UNIT_FILE = pathlib.Path(__file__).parents[1] / "deploy" / "edge-agent.service"


def unit_timeout_stop_s() -> float:
    """`TimeoutStopSec=` of the shipped systemd unit, in seconds."""
    match = re.search(r"^TimeoutStopSec=(\d+)s?$", UNIT_FILE.read_text(), re.MULTILINE)
    assert match, f"{UNIT_FILE} sets no TimeoutStopSec in seconds"
    return float(match.group(1))


@pytest.fixture
def moving_video(tmp_path):
    """A square that moves every frame, so every sampled frame is a new scene to answer."""
    return write_video(tmp_path / "moving.mp4", seconds=2, fps=10)


class StallingEngine:
    """The real engine, except that after `stall()` the next `answer` blocks until `release()`."""

    def __init__(self, engine):
        self._engine = engine
        self.name = engine.name
        self.stuck = threading.Event()
        self._stalling = threading.Event()
        self._released = threading.Event()

    def stall(self) -> None:
        self._stalling.set()

    def release(self) -> None:
        self._released.set()

    def answer(self, context, prompts):
        if self._stalling.is_set():
            self.stuck.set()
            self._released.wait()
        return self._engine.answer(context, prompts)

    def __getattr__(self, name):  # everything else (token counts, the tokenizer) as the real engine has it
        return getattr(self._engine, name)


def test_a_stalled_inference_withholds_the_watchdog_pings_until_it_returns(
    tiny_llava_int8, tiny_engine, broker, moving_video, notify_socket, monkeypatch
):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # systemd would restart after 1 s without a ping
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    engine = StallingEngine(tiny_engine)
    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=engine):
        try:
            assert "WATCHDOG=1" in notify_socket.collect(1.5)
            engine.stall()
            assert engine.stuck.wait(30), "the engine was asked again"
            time.sleep(0.6)  # a ping already earned by the step that stalled may still go out
            notify_socket.drain()
            assert "WATCHDOG=1" not in notify_socket.collect(2.0)
        finally:
            engine.release()
        assert "WATCHDOG=1" in notify_socket.collect(2.0), "pings resume once the inference returns"


class AgentProcess:
    """`edge-agent run --config FILE` as systemd would start it (a notify socket, a watchdog)."""

    def __init__(self, config_file: pathlib.Path, notify_path: pathlib.Path):
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="30000000")
        env.pop("WATCHDOG_PID", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config_file)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()


@pytest.fixture
def start_agent_process(tmp_path, notify_socket):
    """Start `edge-agent run` processes on a config; every one is killed at teardown."""
    processes: list[AgentProcess] = []

    def start(config: dict) -> AgentProcess:
        processes.append(AgentProcess(write_config(tmp_path, config), pathlib.Path(os.environ["NOTIFY_SOCKET"])))
        return processes[-1]

    yield start
    for each in processes:
        each.kill()


def last_payload(listener, *levels: str) -> bytes | None:
    messages = listener.on(topic(*levels))
    return messages[-1].payload if messages else None


def test_sigterm_publishes_offline_and_exits_within_the_units_stop_timeout_even_while_the_camera_hangs(
    tiny_llava_int8, broker, subscriber, mjpeg_camera, start_agent_process
):
    stop_timeout = unit_timeout_stop_s()
    listener = subscriber(broker, topic("availability"), topic("answers", "+"))
    # A hung stream blocks a read for read_timeout_s, longer than systemd waits for the stop.
    camera = {"fps": 5, "read_timeout_s": 2 * stop_timeout, "stale_after_s": 3 * stop_timeout}
    agent = start_agent_process(agent_config(tiny_llava_int8, broker, mjpeg_camera.url, camera=camera))
    wait_until(lambda: listener.on(topic("answers", QUESTIONS[0]["id"])), timeout=60, what="a first answer")

    mjpeg_camera.hang()
    time.sleep(1.0)  # the reader is now blocked inside a read
    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=stop_timeout) == 0, agent.process.stderr.read()
    assert time.monotonic() - started < stop_timeout
    wait_until(lambda: last_payload(listener, "availability") == b"offline", what="offline published")


def test_after_a_crash_and_a_restart_availability_camera_and_every_answer_are_retained_afresh(
    tiny_llava_int8, broker, subscriber, moving_video, start_agent_process
):
    config = agent_config(tiny_llava_int8, broker, moving_video)
    watcher = subscriber(broker, topic("availability"))
    first = start_agent_process(config)
    wait_until(lambda: last_payload(watcher, "availability") == b"online", timeout=60, what="online")

    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    wait_until(lambda: last_payload(watcher, "availability") == b"offline", what="the broker's last will")

    answer_topics = [topic("answers", q["id"]) for q in QUESTIONS]
    answers = subscriber(broker, *answer_topics)
    restarted = time.time()
    start_agent_process(config)
    wait_until(lambda: last_payload(watcher, "availability") == b"online", timeout=60, what="online again")

    def republished(answer_topic: str) -> bool:
        return any(json.loads(m.payload)["frame_ts"] >= restarted for m in answers.on(answer_topic))

    wait_until(lambda: all(map(republished, answer_topics)), timeout=60, what="every answer after the restart")
    late = subscriber(broker, topic("availability"), topic("camera"), *answer_topics)
    wait_until(
        lambda: all(late.on(t) for t in [topic("availability"), topic("camera"), *answer_topics]),
        what="retained state for a new subscriber",
    )
    assert all(late.on(t)[-1].retain for t in [topic("availability"), topic("camera"), *answer_topics])
    assert last_payload(late, "availability") == b"online" and last_payload(late, "camera") == b"online"
    assert all(json.loads(late.on(t)[-1].payload)["frame_ts"] >= restarted for t in answer_topics)
