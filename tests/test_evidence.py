"""The image behind an answer (`edge_agent.evidence`): when a question's published state changes, the JPEG of the
frame it was answered on is published retained on `<base>/<agent>/evidence/<question_id>`, downscaled to
`evidence.max_side`, at most once per `evidence.min_interval_s`; an ask may ask for its own; Home Assistant shows
it as an image entity; `evidence.enabled: false` publishes none and removes the image entities.

The agent runs the tiny model on an image-file camera the test rewrites. `SeeingEngine` makes its yes/no answer
follow the frame (yes on a bright one), so a test can change the published state by changing the scene.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import cv2
import numpy as np
import pytest

from edge_agent.config import EvidenceSettings
from edge_agent.evidence import MAX_EVIDENCE_BYTES, EvidencePacer, evidence_jpeg
from edge_agent.mqtt import EntitySpec
from edge_agent.mqtt.ask import BadRequest, parse_ask, request_message
from tests.support.agent import AGENT, RunningAgent, agent_config, topic
from tests.support.broker import wait_until

DARK, BRIGHT = 40, 200
"""The background grey level of the camera's scene: the door is closed on a dark one, open on a bright one."""
FRAME_WIDTH, FRAME_HEIGHT = 400, 300
MAX_SIDE = 160
MAX_MEAN_DIFFERENCE = 8.0
"""Grey levels a JPEG may differ by on average from the frame it shows (the same frame, downscaled the same way)."""
DOOR = {"id": "door_open", "question": "Is the door open?", "type": "yes_no", "every": 0.3}
EVIDENCE = topic("evidence", "door_open")
ANSWERS = topic("answers", "door_open")
REPLY_TOPIC = "evidence-test/reply"
IMAGE_CONFIG = f"homeassistant/image/{AGENT}_door_open_evidence/config"


def scene(level: int) -> np.ndarray:
    """A frame of background grey `level` with a gradient and a white square, so a wrong crop or a wrong frame
    shows as a large difference."""
    gradient = np.linspace(0, 50, FRAME_WIDTH, dtype=np.float32)[None, :, None]
    frame = np.clip(np.full((FRAME_HEIGHT, FRAME_WIDTH, 3), level, np.float32) + gradient, 0, 255).astype(np.uint8)
    frame[100:180, 60:140] = 255
    return frame


def show(camera, level: int) -> None:
    """Make the image-file camera show `scene(level)`, atomically."""
    written = camera.with_suffix(".tmp.png")
    cv2.imwrite(str(written), scene(level))
    os.replace(written, camera)


def decoded(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the payload is not an image"
    return image


def difference(jpeg: bytes, frame: np.ndarray) -> float:
    """Mean absolute difference in grey levels between the image and `frame` resized to its size."""
    image = decoded(jpeg)
    expected = cv2.resize(frame, image.shape[1::-1], interpolation=cv2.INTER_AREA)
    return float(np.abs(image.astype(np.int16) - expected.astype(np.int16)).mean())


def assert_shows(jpeg: bytes, frame: np.ndarray, other: np.ndarray) -> None:
    """The JPEG is `frame` downscaled to `MAX_SIDE` (aspect kept), and clearly not `other`."""
    height, width = decoded(jpeg).shape[:2]
    assert max(height, width) == MAX_SIDE and abs(width / height - FRAME_WIDTH / FRAME_HEIGHT) < 0.02
    assert difference(jpeg, frame) < MAX_MEAN_DIFFERENCE
    assert difference(jpeg, other) > 3 * MAX_MEAN_DIFFERENCE, "the test's two scenes are too alike to tell apart"


class SeeingEngine:
    """The real engine, answering yes/no by the brightness of the frame behind the context: yes on a bright one."""

    def __init__(self, engine):
        self._engine = engine
        self._bright: dict[int, bool] = {}  # id of a context -> whether its frame is bright

    def encode_views(self, images):
        contexts = self._engine.encode_views(images)
        for context, image in zip(contexts, images):
            self._bright[id(context)] = float(image.mean()) > (DARK + BRIGHT) / 2
        return contexts

    def answer(self, context, prompts):
        text = "yes" if self._bright[id(context)] else "no"
        return [dataclasses.replace(answer, text=text) for answer in self._engine.answer(context, prompts)]

    def __getattr__(self, name):
        return getattr(self._engine, name)


def run_agent(model, engine, broker, camera, **evidence) -> RunningAgent:
    settings = {"max_side": MAX_SIDE, "min_interval_s": 0, **evidence}
    config = agent_config(model, broker, camera, questions=[DOOR], camera={"fps": 10}, mqtt={"heartbeat_s": 0.3})
    return RunningAgent({**config, "evidence": settings}, engine=SeeingEngine(engine))


def wait_for_value(listener, value: bool) -> None:
    wait_until(
        lambda: any(json.loads(m.payload)["value"] is value for m in listener.on(ANSWERS)),
        timeout=30,
        what=f"the answer {value}",
    )


def test_the_first_state_of_a_question_comes_with_the_frame_it_was_answered_on_downscaled_and_retained(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    listener = subscriber(broker, EVIDENCE)
    with run_agent(tiny_llava_int8, tiny_engine, broker, camera):
        image = listener.next(EVIDENCE, timeout=30)

    assert image.retain
    assert_shows(image.payload, scene(DARK), scene(BRIGHT))


def test_a_changed_state_publishes_the_frame_that_changed_it_and_an_unchanged_state_publishes_nothing(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    listener = subscriber(broker, EVIDENCE, ANSWERS)
    with run_agent(tiny_llava_int8, tiny_engine, broker, camera):
        wait_for_value(listener, False)
        show(camera, BRIGHT)
        wait_for_value(listener, True)
        changed_at = time.time()
        show(camera, BRIGHT + 30)  # another scene, answered again: the door is still open
        wait_until(
            lambda: any(json.loads(m.payload)["frame_ts"] > changed_at for m in listener.on(ANSWERS)),
            timeout=30,
            what="an answer on the third scene",
        )

    first, changed = [image.payload for image in listener.on(EVIDENCE)]
    assert_shows(first, scene(DARK), scene(BRIGHT))
    assert_shows(changed, scene(BRIGHT), scene(DARK))


def test_a_flickering_state_publishes_at_most_one_image_per_interval_and_the_last_state_once_it_is_over(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    interval_s = 2.0
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    listener = subscriber(broker, EVIDENCE, ANSWERS)
    with run_agent(tiny_llava_int8, tiny_engine, broker, camera, min_interval_s=interval_s):
        listener.next(EVIDENCE, timeout=30)
        started = time.monotonic()
        for level in [BRIGHT, DARK] * 4 + [BRIGHT]:
            show(camera, level)
            time.sleep(0.5)
        time.sleep(interval_s + 1)
        window_s = time.monotonic() - started

    states = [json.loads(m.payload)["value"] for m in listener.on(ANSWERS)]
    changes = sum(1 for before, after in zip(states, states[1:]) if before != after)
    images = listener.on(EVIDENCE)
    assert changes >= 6, f"the state did not flicker: {states}"
    assert len(images) - 1 <= window_s / interval_s + 1, f"{len(images)} images in {window_s:.1f} s"
    assert len(images) < changes, "every change published its image"
    assert_shows(images[-1].payload, scene(BRIGHT), scene(DARK))


def test_with_evidence_off_no_image_and_no_image_entity_is_published(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    listener = subscriber(broker, topic("evidence", "#"), "homeassistant/image/#", ANSWERS)
    with run_agent(tiny_llava_int8, tiny_engine, broker, camera, enabled=False):
        wait_until(lambda: len(listener.on(ANSWERS)) >= 3, timeout=30, what="three answers")

    assert [m.topic for m in listener.messages if m.topic != ANSWERS and m.payload] == []  # empties clear


def test_turning_evidence_off_removes_the_image_entities_announced_before(broker, subscriber, make_link):
    door = EntitySpec("door_open", "Is the door open?", "yes_no", "door")
    config = "homeassistant/image/kitchen_door_open_evidence/config"
    listener = subscriber(broker, config)
    first_run = make_link(broker)
    first_run.set_entities([door], evidence=True)
    announced = json.loads(listener.next(config).payload)
    first_run.stop()

    second_run = make_link(broker)
    second_run.set_entities([door])

    assert announced["image_topic"] == "edge-agent/kitchen/evidence/door_open"
    assert announced["content_type"] == "image/jpeg"
    assert listener.next(config).payload == b""


def test_an_ask_that_wants_evidence_gets_the_frame_it_was_answered_on_before_its_reply(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, BRIGHT)
    evidence_topic = f"{REPLY_TOPIC}/evidence"
    listener = subscriber(broker, REPLY_TOPIC, evidence_topic, EVIDENCE)
    with run_agent(tiny_llava_int8, tiny_engine, broker, camera):
        listener.next(EVIDENCE, timeout=30)
        for wants_evidence in (True, False):
            payload, properties = request_message("Is the door open?", REPLY_TOPIC)
            request = {**json.loads(payload), "evidence": True} if wants_evidence else json.loads(payload)
            listener.publish(topic("ask"), json.dumps(request), properties=properties)
            listener.next(REPLY_TOPIC, timeout=30)

    with_evidence, without = [json.loads(m.payload) for m in listener.on(REPLY_TOPIC)]
    assert with_evidence["evidence_topic"] == evidence_topic
    assert "evidence_topic" not in without
    [image] = listener.on(evidence_topic)
    assert not image.retain
    assert listener.messages.index(image) < listener.messages.index(listener.on(REPLY_TOPIC)[0])
    assert_shows(image.payload, scene(BRIGHT), scene(DARK))


def test_an_ask_whose_evidence_is_not_true_or_false_is_refused():
    with pytest.raises(BadRequest, match="'evidence' must be true or false"):
        parse_ask(json.dumps({"question": "Door?", "reply_to": "r", "evidence": "yes"}).encode(), None)


def test_an_image_too_large_for_the_byte_bound_is_published_smaller():
    noise = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    settings = EvidenceSettings(max_side=1920, quality=95)

    jpeg = evidence_jpeg(noise, settings)

    assert len(jpeg) <= MAX_EVIDENCE_BYTES
    assert max(decoded(jpeg).shape[:2]) < 1920


def test_the_pacer_publishes_one_image_per_question_per_interval_the_newest_held_one_when_it_is_over():
    pacer = EvidencePacer(min_interval_s=5)
    first, second, third = (np.full((2, 2, 3), level, np.uint8) for level in (1, 2, 3))
    pacer.offer("door", first)
    assert [view for _, view in pacer.due(100.0)] == [first]
    pacer.offer("door", second)
    pacer.offer("door", third)
    pacer.offer("light", first)
    assert [question for question, _ in pacer.due(101.0)] == ["light"]
    assert list(pacer.due(104.9)) == []
    assert [(question, view) for question, view in pacer.due(105.0)] == [("door", third)]


@pytest.mark.timeout(600)
def test_home_assistant_shows_the_image_as_an_image_entity_that_serves_the_jpeg(
    home_assistant, home_assistant_broker, make_link
):
    agent_id = "ha-evidence"
    log_start = len(home_assistant.log())
    jpeg = evidence_jpeg(scene(BRIGHT), EvidenceSettings(max_side=MAX_SIDE))
    link = make_link(home_assistant_broker, agent_id=agent_id)
    link.set_entities([EntitySpec("door_open", "Is the door open?", "yes_no", "door")], evidence=True)
    unique_id = f"edge_agent_{agent_id}_door_open_evidence"
    entity_id = home_assistant.wait_for_entities([unique_id])[unique_id]

    link.publish_evidence("door_open", jpeg)

    assert entity_id.startswith("image.")
    home_assistant.wait_for_state(entity_id, lambda state: state["state"] not in ("unknown", "unavailable"))
    assert home_assistant.image(entity_id) == jpeg
    assert home_assistant.problems(log_start) == []


def test_turning_evidence_off_empties_the_retained_images_of_the_questions(broker, subscriber, make_link):
    door = EntitySpec("door_open", "Is the door open?", "yes_no", "door")
    image = "edge-agent/kitchen/evidence/door_open"
    first_run = make_link(broker)
    first_run.set_entities([door], evidence=True)
    first_run.publish_evidence("door_open", b"\xff\xd8 a jpeg \xff\xd9")
    watcher = subscriber(broker, image)
    watcher.next(image)
    first_run.stop()

    second_run = make_link(broker)
    second_run.set_entities([door])
    wait_until(lambda: watcher.on(image)[-1].payload == b"", what="the image emptied")

    later = subscriber(broker, image)
    time.sleep(1.0)  # a retained image would arrive at once on subscribing
    assert later.on(image) == []


def test_the_retained_image_of_a_question_removed_from_the_config_is_emptied_and_the_others_stay(
    broker, subscriber, make_link
):
    door = EntitySpec("door_open", "Is the door open?", "yes_no", "door")
    light = EntitySpec("light", "Is the light on?", "yes_no", None)
    images = "edge-agent/kitchen/evidence/#"
    first_run = make_link(broker)
    first_run.set_entities([door, light], evidence=True)
    first_run.publish_camera(True)
    for entity in (door, light):
        first_run.publish_evidence(entity.question_id, evidence_jpeg(scene(DARK), EvidenceSettings()))
    listener = subscriber(broker, images)
    wait_until(lambda: len(listener.messages) == 2, timeout=10, what="both retained images")
    first_run.stop()

    second_run = make_link(broker)
    second_run.set_entities([door], evidence=True)
    second_run.publish_camera(True)

    assert listener.next("edge-agent/kitchen/evidence/light").payload  # the retained image, as it was
    assert listener.next("edge-agent/kitchen/evidence/light").payload == b""
    time.sleep(0.5)
    assert [m.payload for m in listener.on("edge-agent/kitchen/evidence/door_open") if not m.payload] == []
