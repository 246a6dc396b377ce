"""Running the real agent in tests: a config for the tiny model, video fixtures, and the agent on a thread."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
import yaml

from edge_agent.config import parse_config
from edge_agent.service import Agent
from tests.support.videos import pattern

AGENT = "kiosk-test"
QUESTIONS = [
    {"id": "door_open", "question": "Is the door open?", "type": "yes_no", "every": 0.5, "device_class": "door"},
    {"id": "people", "question": "How many people are in the room?", "type": "number", "every": 0.5},
    {
        "id": "cup",
        "question": "What colour is the cup?",
        "type": "choice",
        "options": ["red", "blue", "green"],
        "every": 0.5,
    },
    {"id": "scene", "question": "Describe the room.", "type": "text", "every": 0.5, "trigger": "change"},
]


def write_video(path, frames: list[np.ndarray], fps: float = 10):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def static_video(tmp_path_factory):
    """Three seconds of one unchanging scene."""
    return write_video(tmp_path_factory.mktemp("video") / "static.mp4", [pattern(3)] * 30)


@pytest.fixture(scope="session")
def moving_video(tmp_path_factory):
    """A square that jumps to a new place every half second."""
    frames = [pattern(index // 5 * 9) for index in range(40)]
    return write_video(tmp_path_factory.mktemp("video") / "moving.mp4", frames)


@pytest.fixture(autouse=True)
def own_state_directory(tmp_path_factory, monkeypatch):
    """Every test's agents keep their state (`state_dir`'s default: `$STATE_DIRECTORY`, as systemd sets it)
    in a directory of the test's own, never in the home directory where one test's switch would reach
    the next."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path_factory.mktemp("state")))


def agent_config(model, broker, video, **overrides) -> dict:
    config = {
        "agent_id": AGENT,
        "camera": {"source": str(video), "loop": True, "fps": 5},
        "model": {"path": str(model), "max_new_tokens": 4},
        "mqtt": {"host": broker.host, "port": broker.port},
        "questions": QUESTIONS,
        "metrics": {"listen": "127.0.0.1:0"},
        "web": {"listen": "127.0.0.1:0"},
    }
    for section, values in overrides.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    return config


class RunningAgent:
    """An Agent on its own thread, stopped and shut down on exit."""

    def __init__(self, config: dict, engine=None):
        self.agent = Agent(parse_config(config), engine=engine)
        self._thread = threading.Thread(target=self.agent.run, daemon=True)

    def __enter__(self) -> Agent:
        self.agent.start()
        self._thread.start()
        return self.agent

    @property
    def running(self) -> bool:
        """Whether the inference loop still runs (an exception escaping it ends the thread)."""
        return self._thread.is_alive()

    def __exit__(self, *exc_info):
        self.agent.stop()
        self._thread.join(timeout=30)
        self.agent.shutdown()


@pytest.fixture(scope="session")
def tiny_engine(tiny_llava_int8):
    from edge_agent.engine import Engine

    return Engine.load(tiny_llava_int8)


def topic(*levels: str) -> str:
    return "/".join(("edge-agent", AGENT) + levels)


def answered_since(listener, answers_topic: str, moment: float) -> list[dict]:
    """The answers a `subscriber` received on `answers_topic` that the agent gave after `moment` (Unix seconds)."""
    answers = [json.loads(message.payload) for message in listener.on(answers_topic)]
    return [answer for answer in answers if answer["answered_ts"] >= moment]


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
