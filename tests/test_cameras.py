"""Several cameras in one agent, one model in memory.

The single `camera:` form publishes exactly the topics and Home Assistant configs it published before
`cameras:` existed (recorded in tests/data/single_camera_published.json from the code before the change).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from edge_agent import __version__
from tests.support.agent import QUESTIONS, RunningAgent, agent_config
from tests.support.broker import wait_until

pytestmark = pytest.mark.timeout(600)

SINGLE_CAMERA_PUBLISHED = pathlib.Path(__file__).with_name("data") / "single_camera_published.json"
"""Topic -> payload (Home Assistant configs and the announced list) or null (any payload), as published by a
single-camera agent before several cameras existed. `RECORD_SINGLE_CAMERA=1` writes it again."""
SINGLE_CAMERA_QUESTIONS = [*QUESTIONS, {**QUESTIONS[0], "id": "left_door", "region": [0, 0, 0.5, 1]}]


def normalized(payload: bytes, model_name: str) -> str:
    """A payload without what changes between runs that change nothing: the version and the model's path."""
    return payload.decode().replace(__version__, "<version>").replace(json.dumps(model_name)[1:-1], "<model>")


def published_by(agent_config_dict: dict, engine, subscriber, broker) -> dict[str, str | None]:
    """Everything a running agent publishes until every question has answered and had its image published:
    topic -> normalized payload for the discovery configs and the announced list, None for the rest."""
    listener = subscriber(broker, "#")
    question_ids = [question["id"] for question in agent_config_dict["questions"]]
    with RunningAgent(agent_config_dict, engine=engine):
        root = f"edge-agent/{agent_config_dict['agent_id']}"
        wanted = [f"{root}/{kind}/{qid}" for kind in ("answers", "evidence") for qid in question_ids]
        wait_until(lambda: all(listener.on(topic) for topic in wanted), timeout=120, what="every answer and image")
    published = {}
    for message in listener.messages:
        described = message.topic.startswith("homeassistant/") or message.topic.endswith("/discovery")
        published[message.topic] = normalized(message.payload, engine.name) if described else None
    return published


def test_a_single_camera_config_publishes_exactly_the_topics_and_discovery_it_published_before(
    broker, subscriber, tiny_llava_int8, tiny_engine, static_video
):
    config = agent_config(tiny_llava_int8, broker, static_video, questions=SINGLE_CAMERA_QUESTIONS)

    published = published_by(config, tiny_engine, subscriber, broker)

    if os.environ.get("RECORD_SINGLE_CAMERA"):
        SINGLE_CAMERA_PUBLISHED.write_text(json.dumps(published, indent=1, sort_keys=True) + "\n")
    assert published == json.loads(SINGLE_CAMERA_PUBLISHED.read_text())
