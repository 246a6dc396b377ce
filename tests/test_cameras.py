"""Several cameras in one agent, one model in memory.

The single `camera:` form publishes exactly the topics and Home Assistant configs it published before
`cameras:` existed (recorded in tests/data/single_camera_published.json from the code before the change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import cv2
import numpy as np
import pytest

from edge_agent import __version__
from edge_agent.config import parse_config
from edge_agent.devtools.demo import DEMO_MODEL, DEMO_QUESTIONS, truth_of
from edge_agent.devtools.loopback import BrokerAddress
from edge_agent.devtools.scenes import Moment, SyntheticScene, render, scene_timeline
from edge_agent.devtools.scenes import write_video as write_story
from edge_agent.engine import Prompt
from edge_agent.errors import UserError
from edge_agent.mqtt import EntitySpec
from edge_agent.mqtt.ask import request_message
from tests.support.agent import AGENT, QUESTIONS, RunningAgent, agent_config, answered_since, write_video
from tests.support.broker import answer, wait_until
from tests.support.rtsp import RtspCamera

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


# -- the cameras: form ------------------------------------------------------------------------------------


def cameras_config(model_path, broker, cameras: list[dict], **overrides) -> dict:
    """An agent config listing `cameras` instead of the single `camera:` and `questions:`."""
    config = agent_config(model_path, broker, "unused", **overrides)
    del config["camera"], config["questions"]
    return {**config, "cameras": cameras}


def question_about(camera_id: str, template: dict, **changes) -> dict:
    """`template` (a question of tests/support/agent.py or the demo) asked of camera `camera_id`, with an id of
    its own (question ids are unique in the agent)."""
    return {**template, "id": f"{camera_id}_{template['id']}", **changes}


def test_a_config_with_both_cameras_and_the_single_camera_form_is_refused_naming_the_key():
    single_camera = agent_config("m", BrokerAddress("127.0.0.1", 1883, "5", "mosquitto"), "video.mp4")
    both = {**single_camera, "cameras": [{"id": "a", "source": "video.mp4"}]}

    with pytest.raises(UserError, match=r"^config.yaml: questions: cannot be used with cameras"):
        parse_config(both)
    with pytest.raises(UserError, match=r"^config.yaml: camera: cannot be used with cameras"):
        parse_config({**both, "questions": []})


def test_question_ids_are_unique_in_the_whole_agent_and_camera_ids_in_the_list():
    door = {"id": "door", "question": "Is the door open?", "type": "yes_no"}
    twice = [{"id": "a", "questions": [door]}, {"id": "b", "questions": [door]}]

    with pytest.raises(UserError, match=r"cameras\[1\]\.questions\[0\]\.id: duplicate id 'door'"):
        parse_config({"model": {"path": "m"}, "cameras": twice})
    with pytest.raises(UserError, match=r"cameras\[1\]\.id: duplicate id 'a'"):
        parse_config({"model": {"path": "m"}, "cameras": [{"id": "a"}, {"id": "a"}]})


def published_json(listener, topic: str) -> list[dict]:
    return [json.loads(message.payload) for message in listener.on(topic)]


def test_each_camera_is_a_home_assistant_device_linked_to_the_agent_and_available_with_its_camera(
    broker, subscriber, tiny_llava_int8, tiny_engine, static_video, moving_video
):
    cameras = [
        {"id": "hall", "source": str(static_video), "loop": True, "fps": 5, "questions": [QUESTIONS[0]]},
        {"id": "yard", "source": str(moving_video), "loop": True, "fps": 5, "questions": [QUESTIONS[1]]},
    ]
    listener = subscriber(broker, "#")
    with RunningAgent(cameras_config(tiny_llava_int8, broker, cameras), engine=tiny_engine):
        wait_until(
            lambda: all(listener.on(f"edge-agent/{AGENT}/answers/{q}") for q in ("door_open", "people")),
            timeout=60,
            what="both cameras' answers",
        )
    door = json.loads(listener.on(f"homeassistant/binary_sensor/{AGENT}_door_open/config")[0].payload)
    people = json.loads(listener.on(f"homeassistant/sensor/{AGENT}_people/config")[0].payload)
    yard_connected = json.loads(
        listener.on(f"homeassistant/binary_sensor/{AGENT}_yard_camera_connected/config")[0].payload
    )
    latency = json.loads(listener.on(f"homeassistant/sensor/{AGENT}_answer_latency/config")[0].payload)

    assert door["device"]["identifiers"] == [f"edge_agent_{AGENT}_hall"]
    assert people["device"]["identifiers"] == [f"edge_agent_{AGENT}_yard"]
    assert door["device"]["via_device"] == people["device"]["via_device"] == f"edge_agent_{AGENT}"
    assert latency["device"]["identifiers"] == [f"edge_agent_{AGENT}"]
    assert [a["topic"] for a in door["availability"]] == [
        f"edge-agent/{AGENT}/availability",
        f"edge-agent/{AGENT}/camera/hall",
    ]
    assert yard_connected["state_topic"] == f"edge-agent/{AGENT}/camera/yard"
    assert yard_connected["device"]["identifiers"] == [f"edge_agent_{AGENT}_yard"]
    assert listener.on(f"edge-agent/{AGENT}/camera/hall")[0].payload == b"online"
    assert not listener.on(f"edge-agent/{AGENT}/camera")  # the single form's topic: not with cameras:
    assert not listener.on(f"homeassistant/binary_sensor/{AGENT}_camera_connected/config")


def test_the_status_page_shows_every_camera_with_its_frame_and_which_camera_each_question_looks_at(
    broker, tiny_llava_int8, tiny_engine, static_video, moving_video
):
    cameras = [
        {"id": "hall", "source": str(static_video), "loop": True, "fps": 5, "questions": [QUESTIONS[0]]},
        {"id": "yard", "source": str(moving_video), "loop": True, "fps": 5, "questions": [QUESTIONS[1]]},
    ]
    with RunningAgent(cameras_config(tiny_llava_int8, broker, cameras), engine=tiny_engine) as agent:
        wait_until(
            lambda: all(camera["frame"] and camera["online"] for camera in agent.board.snapshot()["cameras"]),
            timeout=30,
            what="both cameras' frames on the page",
        )
        snapshot = agent.board.snapshot()

    assert [camera["id"] for camera in snapshot["cameras"]] == ["hall", "yard"]
    assert {question["id"]: question["camera"] for question in snapshot["questions"]} == {
        "door_open": "hall",
        "people": "yard",
    }
    assert agent.board.frame_jpeg("yard") is not None


def test_an_ask_naming_a_camera_is_answered_on_that_cameras_frame_and_an_unknown_camera_is_refused(
    broker, subscriber, tiny_llava_int8, tiny_engine, tmp_path
):
    reply_topic = "cameras-test/reply"
    cameras = []
    for name, grey in (("dark", 30), ("light", 220)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((96, 128, 3), grey, np.uint8))
        question = question_about(name, QUESTIONS[0])
        cameras.append({"id": name, "source": str(tmp_path / f"{name}.png"), "fps": 2, "questions": [question]})
    listener = subscriber(broker, reply_topic, f"{reply_topic}/evidence", f"edge-agent/{AGENT}/answers/#")

    def ask(**fields) -> dict:
        payload, properties = request_message("Is it lit?", reply_topic)
        request = {**json.loads(payload), "evidence": True, **fields}
        listener.publish(f"edge-agent/{AGENT}/ask", json.dumps(request).encode(), properties=properties)
        return json.loads(listener.next(reply_topic, timeout=30).payload)

    with RunningAgent(cameras_config(tiny_llava_int8, broker, cameras), engine=tiny_engine) as agent:
        wait_until(lambda: listener.on(f"edge-agent/{AGENT}/answers/light_door_open"), timeout=30, what="answers")
        answered = ask(camera="light")
        image = cv2.imdecode(
            np.frombuffer(listener.next(f"{reply_topic}/evidence").payload, np.uint8), cv2.IMREAD_GRAYSCALE
        )
        refused = ask(camera="attic")
        latency_count = agent.metrics.registry.get_sample_value(
            "edge_agent_answer_latency_seconds_count", {"camera": "dark"}
        )
        waits = agent.metrics.registry.get_sample_value("edge_agent_queue_wait_seconds_count", {"camera": "light"})

    assert "answer" in answered and abs(float(image.mean()) - 220) < 10
    assert refused == {**refused, "error": "'camera' must be one of dark, light"}
    assert latency_count >= 1 and waits >= 1


def test_a_hung_camera_goes_offline_alone_and_the_other_cameras_answers_go_on(
    broker, subscriber, tiny_llava_int8, tiny_engine, moving_video, rtsp_camera
):
    fast = {"fps": 5, "read_timeout_s": 1, "stale_after_s": 1.5, "open_timeout_s": 2, "backoff_max_s": 1}
    cameras = [
        {"id": "street", "source": rtsp_camera.url, **fast, "questions": [question_about("street", QUESTIONS[0])]},
        {"id": "room", "source": str(moving_video), "loop": True, "fps": 5, "questions": [QUESTIONS[1]]},
    ]
    listener = subscriber(broker, f"edge-agent/{AGENT}/#")
    room_answers = f"edge-agent/{AGENT}/answers/people"
    with RunningAgent(cameras_config(tiny_llava_int8, broker, cameras), engine=tiny_engine) as agent:
        wait_until(lambda: listener.on(f"edge-agent/{AGENT}/answers/street_door_open"), timeout=60, what="street")
        rtsp_camera.hang()
        wait_until(
            lambda: [m.payload for m in listener.on(f"edge-agent/{AGENT}/camera/street")][-1:] == [b"offline"],
            timeout=30,
            what="the hung camera reported offline",
        )
        hung_at = time.time()
        wait_until(lambda: len(answered_since(listener, room_answers, hung_at)) >= 3, timeout=30, what="room answers")
        assert [m.payload for m in listener.on(f"edge-agent/{AGENT}/camera/room")][-1] == b"online"
        assert agent.metrics.registry.get_sample_value("edge_agent_camera_online", {"camera": "street"}) == 0
        assert agent.metrics.registry.get_sample_value("edge_agent_camera_online", {"camera": "room"}) == 1
        rtsp_camera.stop()  # a camera gone for good delays nobody either
        gone_at = time.time()
        wait_until(lambda: len(answered_since(listener, room_answers, gone_at)) >= 3, timeout=30, what="room answers")


def noise_video(path, frames: int = 50):
    """A camera whose whole image changes on every frame: the scene gate finds every frame a new scene."""
    rng = np.random.default_rng(0)
    return write_video(path, [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(frames)])


def test_a_camera_whose_scene_always_changes_does_not_starve_the_others(
    broker, subscriber, tiny_llava_int8, tiny_engine, moving_video, tmp_path
):
    always = question_about("busy", QUESTIONS[0], trigger="change", every=0.01)
    cameras = [
        {
            "id": "busy",
            "source": str(noise_video(tmp_path / "noise.mp4")),
            "loop": True,
            "fps": 10,
            "questions": [always],
        },
        {"id": "calm", "source": str(moving_video), "loop": True, "fps": 5, "questions": [QUESTIONS[1]]},
    ]
    listener = subscriber(broker, f"edge-agent/{AGENT}/answers/#")
    with RunningAgent(cameras_config(tiny_llava_int8, broker, cameras), engine=tiny_engine) as agent:
        changes = agent.metrics.camera_scene_changes
        wait_until(lambda: changes.labels(camera="busy")._value.get() >= 30, timeout=60, what="30 busy scenes")
        calm_encodes = agent.metrics.camera_encodes.labels(camera="calm")._value.get()
        calm_answers = published_json(listener, f"edge-agent/{AGENT}/answers/people")

    assert calm_encodes >= 5, "the calm camera's scene changes were encoded too"
    assert len({answer["frame_ts"] for answer in calm_answers}) >= 5, "and answered, frame after frame"


def test_the_context_budget_drops_the_least_recently_used_contexts_and_they_are_encoded_again(
    broker, tiny_llava_int8, tiny_engine, static_video
):
    context = tiny_engine.encode(np.zeros((48, 64, 3), np.uint8))
    tiny_engine.answer(context, [Prompt("Is it lit?", 1)])  # the prefix is cached with the first answer
    one_context_mb = context.nbytes / 2**20

    def run(budget_mb: float) -> dict[str, tuple[float, float]]:
        """camera -> (scene changes, encodes) after each camera answered a few times; the contexts kept."""
        cameras = [
            {
                "id": name,
                "source": str(static_video),
                "loop": True,
                "fps": 5,
                "questions": [question_about(name, QUESTIONS[0], every=0.3)],
            }
            for name in ("one", "two")
        ]
        config = cameras_config(tiny_llava_int8, broker, cameras)
        config["model"]["context_budget_mb"] = budget_mb
        with RunningAgent(config, engine=tiny_engine) as agent:
            published = agent.metrics.answers_published
            wait_until(lambda: published._value.get() >= 8, timeout=60, what="8 answers")
            counts = {
                name: (
                    agent.metrics.camera_scene_changes.labels(camera=name)._value.get(),
                    agent.metrics.camera_encodes.labels(camera=name)._value.get(),
                )
                for name in ("one", "two")
            }
            kept = [view for view in agent._views if view.has_context]
        return counts, len(kept)

    unbounded, kept_unbounded = run(budget_mb=0)
    bounded, kept_bounded = run(budget_mb=1.5 * one_context_mb)  # room for one view's context, not two

    assert unbounded == {"one": (1, 1), "two": (1, 1)} and kept_unbounded == 2
    assert all(changes == 1 and encodes >= 2 for changes, encodes in bounded.values()), bounded
    assert kept_bounded <= 1


# -- three kinds of camera on the demo model --------------------------------------------------------------

DEMO = pathlib.Path(__file__).resolve().parents[1] / DEMO_MODEL
MOMENT_S = 2.0  # each scene of a camera's story lasts two seconds
CAMERA_FPS = 2.0
SETTLE_S = 1.5  # "within a few frames" of each change


def story_of(scenes: list[SyntheticScene]) -> list[Moment]:
    return [Moment(start=index * MOMENT_S, scene=scene) for index, scene in enumerate(scenes)]


def image_folder(path: pathlib.Path, timeline: list[Moment]) -> pathlib.Path:
    """A still camera: one image per moment, shown in name order."""
    path.mkdir()
    rng = np.random.default_rng(1)
    for index, moment in enumerate(timeline):
        cv2.imwrite(str(path / f"{index:02d}.png"), render(moment.scene, 640, 480, rng))
    return path


def follows(answers: list[dict], timeline: list[Moment], question_id: str, template_id: str) -> None:
    """The camera's published values reach the truth of each moment of its story within `SETTLE_S`."""
    start = min(answer["frame_ts"] for answer in answers)  # the camera's first frame is its story's time zero
    published = sorted((answer["frame_ts"] - start, answer["value"]) for answer in answers)
    for moment in timeline:
        truth = truth_of(template_id, moment.scene)
        settled = [value for t, value in published if t <= moment.start + SETTLE_S]
        assert settled and settled[-1] == truth, f"{question_id} at {moment.start} s: truth {truth!r}, got {published}"


def test_three_cameras_of_three_kinds_on_one_demo_model_each_follow_their_own_truth(broker, subscriber, tmp_path):
    room = story_of([moment.scene for moment in scene_timeline(seed=0)[:4]])  # the door opens, people come in
    base = room[0].scene
    still = story_of([dataclasses.replace(base, people=3, door_open=True), dataclasses.replace(base, people=1)])
    street_scene = dataclasses.replace(base, people=2, door_open=False, layout_seed=base.layout_seed + 1)
    street_image = tmp_path / "street.png"
    cv2.imwrite(str(street_image), render(street_scene, 640, 480, np.random.default_rng(2)))
    street = RtspCamera(image=street_image, size=(640, 480))  # an IP camera whose scene stays as it is
    video = write_story(tmp_path / "room.mp4", room, fps=10, size=(640, 480), seconds=len(room) * MOMENT_S)
    door, people = (question for question in DEMO_QUESTIONS if question["id"] in ("door_open", "people"))
    every = {"every": 0.25}
    cameras = [
        {
            "id": "room",
            "source": str(video),
            "fps": CAMERA_FPS,
            "questions": [question_about("room", door, **every), question_about("room", people, **every)],
        },
        {
            "id": "still",
            "source": str(image_folder(tmp_path / "still", still)),
            "fps": 1 / MOMENT_S,
            "questions": [question_about("still", door, **every), question_about("still", people, **every)],
        },
        {
            "id": "street",
            "source": street.url,
            "fps": CAMERA_FPS,
            "questions": [question_about("street", door, **every), question_about("street", people, **every)],
        },
    ]
    config = cameras_config(DEMO, broker, cameras)
    listener = subscriber(broker, f"edge-agent/{AGENT}/answers/#")
    street.start()
    try:
        with RunningAgent(config) as agent:
            wait_until(
                lambda: agent._feeds[0].reader.ended and agent._feeds[1].reader.ended, timeout=120, what="both stories"
            )
            street_answers = {
                template["id"]: published_json(listener, f"edge-agent/{AGENT}/answers/street_{template['id']}")
                for template in (door, people)
            }
    finally:
        street.stop()

    for camera, timeline in (("room", room), ("still", still)):
        for template in (door, people):
            question_id = f"{camera}_{template['id']}"
            follows(
                published_json(listener, f"edge-agent/{AGENT}/answers/{question_id}"),
                timeline,
                question_id,
                template["id"],
            )
    for template_id, answers in street_answers.items():  # its scene stays: answered once, then reused
        assert {answer["value"] for answer in answers} == {truth_of(template_id, street_scene)}, answers


def test_home_assistant_groups_each_cameras_entities_on_its_device_via_the_agent_and_makes_them_unavailable_alone(
    home_assistant, home_assistant_broker, make_link
):
    agent_id = "ha-cameras"
    log_start = len(home_assistant.log())
    hall, yard = (
        EntitySpec(f"{name}_door", "Is the door open?", "yes_no", "door", camera=name) for name in ("hall", "yard")
    )
    link = make_link(home_assistant_broker, agent_id=agent_id)
    link.set_entities([hall, yard], cameras=("hall", "yard"))
    for name in ("hall", "yard"):
        link.publish_camera(True, name)
    for entity in (hall, yard):
        link.publish_answer(answer(entity.question_id, value=True, state="ON"))
    unique_ids = [f"edge_agent_{agent_id}_{object_id}" for object_id in ("hall_door", "yard_door", "answer_latency")]
    registered = home_assistant.wait_for_entities(unique_ids)
    hall_entity, yard_entity = registered[unique_ids[0]], registered[unique_ids[1]]
    for entity_id in (hall_entity, yard_entity):
        home_assistant.wait_for_state(entity_id, lambda state: state["state"] == "on")

    agent_device = home_assistant.device(f"edge_agent_{agent_id}")
    camera_devices = [home_assistant.device(f"edge_agent_{agent_id}_{name}") for name in ("hall", "yard")]
    assert [device["name"] for device in camera_devices] == [
        f"edge-agent {agent_id} hall",
        f"edge-agent {agent_id} yard",
    ]
    assert all(device["via_device_id"] == agent_device["id"] for device in camera_devices)

    link.publish_camera(False, "yard")

    home_assistant.wait_for_state(yard_entity, lambda state: state["state"] == "unavailable")
    assert home_assistant.state(hall_entity)["state"] == "on"
    assert home_assistant.problems(log_start) == []
