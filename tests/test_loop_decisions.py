"""The agent loop's decisions and the times its answers carry.

`decide` is pure: its table is tested case by case without a model or a broker. The fault tests run the
real agent (tiny model, real mosquitto, a camera that is an image file the test rewrites) and check which
frame an answer was computed on and what times it carries.
"""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest

from edge_agent.loop import Turn, decide
from edge_agent.mqtt.ask import request_message
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import wait_until
from tests.support.videos import FRAME_SIZE

DARK, BRIGHT = 40, 220
"""The grey level of the camera's scene before and after it changes."""
REPLY_TOPIC = "loop-test/reply"
DOOR = {"id": "door_open", "question": "Is the door open?", "type": "yes_no"}


DECISIONS = [
    # changed, have_context, due, pending_asks -> turn
    pytest.param(False, True, 0, 0, Turn.SKIP, id="unchanged-nothing-waits"),
    pytest.param(True, True, 0, 0, Turn.SKIP, id="changed-nothing-waits-so-not-encoded-yet"),
    pytest.param(True, False, 0, 0, Turn.SKIP, id="first-frame-nothing-waits"),
    pytest.param(False, False, 0, 0, Turn.SKIP, id="no-frame-nothing-waits"),
    pytest.param(True, False, 1, 0, Turn.ENCODE, id="first-frame-due"),
    pytest.param(True, False, 0, 1, Turn.ENCODE, id="first-frame-ask"),
    pytest.param(True, False, 2, 3, Turn.ENCODE, id="first-frame-due-and-asks"),
    pytest.param(True, True, 1, 0, Turn.ENCODE, id="changed-due"),
    pytest.param(True, True, 0, 1, Turn.ENCODE, id="changed-ask-nothing-due"),
    pytest.param(True, True, 2, 3, Turn.ENCODE, id="changed-due-and-asks"),
    pytest.param(False, True, 1, 0, Turn.REUSE, id="unchanged-due"),
    pytest.param(False, True, 0, 1, Turn.REUSE, id="unchanged-ask"),
    pytest.param(False, True, 2, 3, Turn.REUSE, id="unchanged-due-and-asks"),
    pytest.param(False, False, 0, 1, Turn.NO_FRAME, id="no-frame-ask"),
    pytest.param(False, False, 2, 3, Turn.NO_FRAME, id="no-frame-due-and-asks"),
    pytest.param(False, False, 1, 0, Turn.NO_FRAME, id="no-frame-due"),
]
"""Every case: whether the newest frame changed and a context exists, by nothing / due / asks / both waiting."""


@pytest.mark.parametrize(("changed", "have_context", "due", "pending_asks", "turn"), DECISIONS)
def test_the_loop_encodes_only_a_changed_frame_something_waits_for_and_else_reuses_or_skips(
    changed, have_context, due, pending_asks, turn
):
    assert decide(changed=changed, have_context=have_context, due=due, pending_asks=pending_asks) is turn


class RecordingEngine:
    """The real engine, remembering how bright the frame behind each context was and which contexts answered."""

    def __init__(self, engine):
        self._engine = engine
        self._encoded: list[tuple[object, float]] = []  # (context, mean grey level of its frame)
        self.answered_on: list[float] = []  # the grey level of the frame behind each answer call's context

    def encode_views(self, images):
        contexts = self._engine.encode_views(images)
        self._encoded += [(context, float(image.mean())) for context, image in zip(contexts, images)]
        return contexts

    def answer(self, context, prompts):
        self.answered_on.append(next(level for encoded, level in self._encoded if encoded is context))
        return self._engine.answer(context, prompts)

    def __getattr__(self, name):  # everything else (name, tokenizer, token counts) as the real engine has it
        return getattr(self._engine, name)


def show(camera, level: int) -> None:
    """Make the image-file camera show a uniform scene of grey `level`, atomically."""
    width, height = FRAME_SIZE
    written = camera.with_suffix(".tmp.png")
    cv2.imwrite(str(written), np.full((height, width, 3), level, np.uint8))
    os.replace(written, camera)


def change_scene(agent, camera, level: int) -> None:
    """Make the camera show grey `level` and wait until the loop has looked at frames of it."""
    show(camera, level)
    seen = agent.metrics.frames._value.get()
    wait_until(lambda: agent.metrics.frames._value.get() >= seen + 3, timeout=10, what="frames of the new scene")


def ask(listener, question: str) -> dict:
    """Ask the running agent over MQTT 5 and return its reply."""
    payload, properties = request_message(question, REPLY_TOPIC)
    listener.publish(topic("ask"), payload, properties=properties)
    return json.loads(listener.next(REPLY_TOPIC, timeout=30).payload)


def assert_times_are_consistent(answer: dict) -> None:
    """`frame_ts` <= `answered_ts`, and `latency_ms` is the time between them."""
    assert answer["frame_ts"] <= answer["answered_ts"], answer
    assert answer["latency_ms"] == round((answer["answered_ts"] - answer["frame_ts"]) * 1000.0, 1), answer


def test_an_ask_after_the_scene_changed_is_answered_on_the_new_scene_and_carries_its_capture_time(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    engine = RecordingEngine(tiny_engine)
    listener = subscriber(broker, topic("answers", DOOR["id"]), REPLY_TOPIC)
    once = [dict(DOOR, every=3600)]  # answered on the first frame, then never due during the test
    with RunningAgent(agent_config(tiny_llava_int8, broker, camera, questions=once), engine=engine) as agent:
        listener.next(topic("answers", DOOR["id"]), timeout=30)
        changed_at = time.time()
        change_scene(agent, camera, BRIGHT)
        reply = ask(listener, "What is on the screen?")

    assert engine.answered_on[-1] == BRIGHT, "the ask was answered on a frame of the old scene"
    assert changed_at <= reply["frame_ts"], reply
    assert_times_are_consistent(reply)


def test_a_republished_answer_never_carries_a_frame_later_than_its_answer(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video
):
    listener = subscriber(broker, topic("answers", DOOR["id"]))
    config = agent_config(
        tiny_llava_int8, broker, static_video, questions=[dict(DOOR, every=0.3)], mqtt={"heartbeat_s": 0.3}
    )
    with RunningAgent(config, engine=tiny_engine):
        wait_until(lambda: len(listener.on(topic("answers", DOOR["id"]))) >= 4, timeout=30, what="four answers")

    answers = [json.loads(message.payload) for message in listener.on(topic("answers", DOOR["id"]))]
    assert not all(answer["scene_changed"] for answer in answers), "no answer was reused on the unchanged scene"
    for answer in answers:
        assert_times_are_consistent(answer)


def test_a_change_question_answered_on_a_scene_an_ask_encoded_says_the_scene_changed(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, DARK)
    engine = RecordingEngine(tiny_engine)
    listener = subscriber(broker, topic("answers", "scene"), REPLY_TOPIC)
    on_change = [{"id": "scene", "question": "Describe the room.", "type": "text", "trigger": "change", "every": 2}]
    with RunningAgent(agent_config(tiny_llava_int8, broker, camera, questions=on_change), engine=engine) as agent:
        first = json.loads(listener.next(topic("answers", "scene"), timeout=30).payload)
        change_scene(agent, camera, BRIGHT)  # usually before the question is due again, 2 s after its answer
        ask(listener, "What is on the screen?")
        second = json.loads(listener.next(topic("answers", "scene"), timeout=30).payload)

    assert engine.answered_on == [DARK, BRIGHT, BRIGHT], "the ask and the second answer were not on the new scene"
    assert first["scene_changed"] and second["scene_changed"], second


def test_after_a_video_file_played_to_its_end_the_loop_waits_instead_of_spinning(
    tiny_llava_int8, tiny_engine, broker, static_video
):
    config = agent_config(tiny_llava_int8, broker, static_video, camera={"loop": False, "fps": 10})
    running = RunningAgent(config, engine=tiny_engine)
    with running as agent:
        wait_until(lambda: agent._feeds[0].reader.ended, timeout=30, what="the video ended")
        clock = time.pthread_getcpuclockid(running._thread.ident)
        before = time.clock_gettime(clock)
        time.sleep(2.0)
        busy_s = time.clock_gettime(clock) - before
    assert busy_s < 0.5, f"the loop thread used {busy_s:.2f} s of CPU in 2 s with no camera"
