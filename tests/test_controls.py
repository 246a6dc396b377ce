"""Controls: a switch per question (kept across restarts in the state directory) and check-now buttons.

The parsers and the controls file are tested alone; the rest runs the real agent (tiny model, real
mosquitto) and drives it through its command topics as Home Assistant's switch and buttons do.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from edge_agent.config import parse_config, usable_state_dir
from edge_agent.controls import CONTROLS_FILE, MAX_FILE_BYTES, Controls
from edge_agent.errors import UserError
from edge_agent.loop import Turn, decide
from edge_agent.mqtt import AgentLink, AgentTopics, EntitySpec
from edge_agent.mqtt.commands import CHECK, ENABLED, BadCommand, Command, parse_command
from edge_agent.mqtt.discovery import read_announced
from edge_agent.service import Agent
from tests.support.agent import AGENT, RunningAgent, agent_config, answered_since, topic
from tests.support.broker import wait_until
from tests.test_hardening_config import mounted_tmpfs

TOPICS = AgentTopics("edge-agent", AGENT)
IDS = frozenset({"door_open", "people"})
ROOT = TOPICS.root
DOOR = {"id": "door_open", "question": "Is the door open?", "type": "yes_no", "every": 0.5}
PEOPLE = {"id": "people", "question": "How many people are in the room?", "type": "number", "every": 0.5}
NOT_DUE_FOR_AN_HOUR = {"every": 3600}
PRESS_TIMEOUT_S = 20.0
"""A press is answered in the next turn; the bound only keeps a broken test from hanging."""


# -- parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_name, payload, command",
    [
        (f"{ROOT}/enabled/door_open/set", b"ON", Command(ENABLED, "door_open", True)),
        (f"{ROOT}/enabled/people/set", b"OFF", Command(ENABLED, "people", False)),
        (f"{ROOT}/check/door_open", b"PRESS", Command(CHECK, "door_open")),
        (f"{ROOT}/check", b"PRESS", Command(CHECK, None)),
    ],
)
def test_a_command_is_read_from_its_exact_payload_on_the_agents_own_command_topic(topic_name, payload, command):
    assert parse_command(TOPICS, topic_name, payload, IDS) == command


@pytest.mark.parametrize(
    "topic_name, payload",
    [
        (f"{ROOT}/enabled/door_open/set", b"on"),
        (f"{ROOT}/enabled/door_open/set", b"ON "),
        (f"{ROOT}/enabled/door_open/set", b""),
        (f"{ROOT}/enabled/door_open/set", b"TOGGLE"),
        (f"{ROOT}/enabled/door_open/set", b"PRESS"),
        (f"{ROOT}/enabled/door_open/set", b"\xff\xfeON"),
        (f"{ROOT}/enabled/door_open/set", b"ON" * 40_000),
        (f"{ROOT}/check/door_open", b"ON"),
        (f"{ROOT}/check", b"press"),
        (f"{ROOT}/enabled/garage/set", b"ON"),
        (f"{ROOT}/check/garage", b"PRESS"),
        (f"{ROOT}/check/" + "x" * 5000, b"PRESS"),
        (f"{ROOT}/enabled/door_open", b"ON"),
        (f"{ROOT}/enabled/door_open/set/again", b"ON"),
        (f"edge-agent/{AGENT}-other/check", b"PRESS"),
        (f"{ROOT}/ask", b"PRESS"),
    ],
)
def test_anything_but_a_command_on_a_command_topic_is_refused_with_a_reason(topic_name, payload):
    with pytest.raises(BadCommand) as refused:
        parse_command(TOPICS, topic_name, payload, IDS)
    assert len(refused.value.reason) < 120


def test_a_check_now_encodes_the_newest_frame_even_when_the_gate_finds_it_unchanged():
    assert decide(changed=False, have_context=True, due=1, pending_asks=0, forced=True) is Turn.ENCODE
    assert decide(changed=False, have_context=True, due=1, pending_asks=0) is Turn.REUSE
    assert decide(changed=False, have_context=False, due=1, pending_asks=0, forced=True) is Turn.NO_FRAME


# -- the controls file ---------------------------------------------------------------------------------


def test_the_enabled_questions_are_saved_and_read_back(tmp_path):
    controls = Controls.load(["door_open", "people"], str(tmp_path))
    controls.set("door_open", False)
    controls.save()

    again = Controls.load(["door_open", "people"], str(tmp_path))

    assert again.states == {"door_open": False, "people": True}
    assert json.loads((tmp_path / CONTROLS_FILE).read_text()) == {"enabled": {"door_open": False, "people": True}}


def test_a_save_that_fails_halfway_leaves_the_old_file_whole_and_nothing_beside_it(tmp_path, monkeypatch, caplog):
    controls = Controls.load(["door_open"], str(tmp_path))
    controls.save()
    old = (tmp_path / CONTROLS_FILE).read_bytes()

    def disk_fails(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_fails)
    controls.set("door_open", False)
    with caplog.at_level(logging.WARNING):
        controls.save()

    assert (tmp_path / CONTROLS_FILE).read_bytes() == old
    assert sorted(path.name for path in tmp_path.iterdir()) == [CONTROLS_FILE]
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / CONTROLS_FILE}: cannot save the enabled questions ([Errno 5] Input/output error); "
        "the change holds until restart"
    ]
    assert controls.enabled("door_open") is False


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"enabled": ["door_open"]}',
        b"[" * 100_000,
        b'{"enabled": {"door_open": false, "pad": "' + b"x" * MAX_FILE_BYTES + b'"}}',
        b"\xff\xfe\x00",
    ],
    ids=["not-json", "a-list", "not-a-mapping", "deep", "too-large", "binary"],
)
def test_a_corrupt_controls_file_is_one_warning_and_every_question_starts_enabled(tmp_path, content, caplog):
    (tmp_path / CONTROLS_FILE).write_bytes(content)

    with caplog.at_level(logging.WARNING):
        controls = Controls.load(["door_open", "people"], str(tmp_path))

    assert controls.states == {"door_open": True, "people": True}
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().endswith("; every question starts enabled")


def test_unknown_question_ids_and_values_that_are_not_booleans_in_the_controls_file_are_ignored(tmp_path, caplog):
    saved = {"enabled": {"door_open": False, "gone": False, "people": "no", "__proto__": True}}
    (tmp_path / CONTROLS_FILE).write_text(json.dumps(saved))

    with caplog.at_level(logging.WARNING):
        controls = Controls.load(["door_open", "people"], str(tmp_path))

    assert controls.states == {"door_open": False, "people": True}
    assert len(caplog.records) == 1 and "1 entries are not true or false" in caplog.records[0].getMessage()


def test_a_state_dir_that_is_a_file_stops_the_agent_with_one_line(tmp_path, tiny_llava_int8, tiny_engine, static_video):
    state_file = tmp_path / "state"
    state_file.write_text("not a directory")
    config = agent_config(tiny_llava_int8, _NoBroker, static_video, state_dir=str(state_file))

    agent = Agent(parse_config(config), engine=tiny_engine)
    with pytest.raises(UserError) as stopped:
        agent.start()
    agent.shutdown()

    assert str(stopped.value) == f"state_dir: {state_file} is a file, not a directory"


def test_an_unwritable_state_dir_is_one_warning_and_the_controls_are_not_kept(tmp_path, caplog):
    question_ids = ["door_open"]
    with mounted_tmpfs(tmp_path / "state", "ro,size=64k") as state:
        with caplog.at_level(logging.WARNING):
            controls = Controls.load(question_ids, usable_state_dir(str(state)))
            controls.set("door_open", False)
            controls.save()

    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"state_dir: {state} is not writable (Read-only file system); enabled questions are not kept across restarts"
    ]
    assert controls.path is None


class _NoBroker:
    host, port = "127.0.0.1", 1


# -- discovery -----------------------------------------------------------------------------------------


def test_the_switches_and_buttons_are_announced_and_removed_like_the_question_entities(broker, subscriber):
    listener = subscriber(broker, "homeassistant/#", topic("discovery"))
    door = EntitySpec("door_open", "Is the door open?", "yes_no", "door")
    people = EntitySpec("people", "How many people?", "number", None)
    switch, button = f"homeassistant/switch/{AGENT}_door_open/config", f"homeassistant/button/{AGENT}_door_open/config"
    check_all = f"homeassistant/button/{AGENT}/check_all/config"
    gone = [f"homeassistant/switch/{AGENT}_people/config", f"homeassistant/button/{AGENT}_people/config"]

    first = running_link(broker, [door, people])
    wait_until(lambda: all(listener.on(config) for config in [switch, button, check_all, *gone]), what="controls")
    first.stop()
    second = running_link(broker, [door])
    try:
        wait_until(lambda: all(listener.on(config)[-1].payload == b"" for config in gone), what="controls removed")
        wait_until(lambda: len(listener.on(topic("discovery"))) >= 2, what="the second list")
    finally:
        second.stop()

    switch_config = json.loads(listener.on(switch)[-1].payload)
    assert switch_config["command_topic"] == topic("enabled", "door_open", "set")
    assert switch_config["state_topic"] == topic("enabled", "door_open")
    assert (switch_config["payload_on"], switch_config["payload_off"]) == ("ON", "OFF")
    assert switch_config["entity_category"] == "config"
    assert switch_config["availability"] == [
        {"topic": topic("availability"), "payload_available": "online", "payload_not_available": "offline"}
    ]
    button_config = json.loads(listener.on(button)[-1].payload)
    assert (button_config["command_topic"], button_config["payload_press"]) == (topic("check", "door_open"), "PRESS")
    assert json.loads(listener.on(check_all)[-1].payload)["command_topic"] == topic("check")
    unique_ids = [json.loads(listener.on(config)[0].payload)["unique_id"] for config in [switch, button, check_all]]
    assert len(set(unique_ids)) == 3 and f"edge_agent_{AGENT}_door_open" not in unique_ids
    announced = listener.on(topic("discovery"))[-1].payload
    own, problem = read_announced(announced, "homeassistant", AGENT, 64 * 1024)
    assert problem is None and {switch, button, check_all} <= own


def running_link(broker, entities: list[EntitySpec]) -> AgentLink:
    link = AgentLink(
        parse_config({"model": {"path": "m"}, "mqtt": {"host": broker.host, "port": broker.port}}).mqtt,
        AGENT,
        model_name="tiny",
        on_command=lambda command: None,
    )
    link.start()
    wait_until(lambda: link.connected, what="link connected")
    link.set_entities(entities)
    return link


# -- the running agent ---------------------------------------------------------------------------------


def controls_config(model, broker, video, state_dir, questions=(DOOR, PEOPLE), **mqtt) -> dict:
    return agent_config(model, broker, video, questions=list(questions), state_dir=str(state_dir), mqtt=mqtt)


def answered_after(listener, question_id: str, moment: float) -> list[dict]:
    return answered_since(listener, topic("answers", question_id), moment)


def test_a_question_switched_off_stops_its_answers_and_stays_off_after_a_restart(
    tiny_llava_int8, tiny_engine, broker, subscriber, moving_video, tmp_path
):
    listener = subscriber(broker, topic("answers", "#"), topic("enabled", "#"))
    config = controls_config(tiny_llava_int8, broker, moving_video, tmp_path / "state", heartbeat_s=0.1)
    with RunningAgent(config, engine=tiny_engine):
        wait_until(lambda: listener.on(topic("answers", "door_open")), timeout=60, what="a door answer")
        listener.publish(topic("enabled", "door_open", "set"), "OFF")
        wait_until(lambda: [m.payload for m in listener.on(topic("enabled", "door_open"))][-1:] == [b"OFF"])
        switched_off = time.time()
        wait_until(lambda: len(answered_after(listener, "people", switched_off)) >= 5, timeout=30, what="5 answers")

    topics_in_order = [message.topic for message in listener.messages]
    off_at = topics_in_order.index(topic("enabled", "door_open"), topics_in_order.index(topic("answers", "door_open")))
    assert topic("answers", "door_open") not in topics_in_order[off_at:]
    assert json.loads((tmp_path / "state" / CONTROLS_FILE).read_text())["enabled"]["door_open"] is False

    restarted = time.time()
    with RunningAgent(config, engine=tiny_engine):
        wait_until(lambda: len(answered_after(listener, "people", restarted)) >= 5, timeout=60, what="5 answers")
    assert answered_after(listener, "door_open", restarted) == []
    assert listener.on(topic("enabled", "door_open"))[-1].payload == b"OFF"


def test_a_press_answers_at_once_on_a_newly_encoded_frame_while_the_question_is_not_due(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video, tmp_path
):
    questions = [{**DOOR, **NOT_DUE_FOR_AN_HOUR}, {**PEOPLE, **NOT_DUE_FOR_AN_HOUR}]
    listener = subscriber(broker, topic("answers", "#"))
    config = controls_config(tiny_llava_int8, broker, static_video, tmp_path, questions)
    with RunningAgent(config, engine=tiny_engine) as agent:
        first = json.loads(listener.next(topic("answers", "door_open"), timeout=60).payload)
        listener.next(topic("answers", "people"))
        assert agent.metrics.encodes._value.get() == 1

        pressed = time.time()
        listener.publish(topic("check", "door_open"), "PRESS")
        door = json.loads(listener.next(topic("answers", "door_open"), timeout=PRESS_TIMEOUT_S).payload)
        assert door["answered_ts"] >= pressed and door["frame_ts"] > first["frame_ts"]
        assert agent.metrics.encodes._value.get() == 2
        assert answered_after(listener, "people", pressed) == []

        pressed_all = time.time()
        listener.publish(topic("check"), "PRESS")
        for question_id in ("door_open", "people"):
            answer = json.loads(listener.next(topic("answers", question_id), timeout=PRESS_TIMEOUT_S).payload)
            assert answer["answered_ts"] >= pressed_all
        assert agent.metrics.encodes._value.get() == 3


def test_a_flood_of_presses_and_switch_flips_is_rate_limited(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video, tmp_path
):
    burst = 2
    listener = subscriber(broker, topic("enabled", "door_open"))
    config = controls_config(
        tiny_llava_int8,
        broker,
        static_video,
        tmp_path,
        [{**DOOR, **NOT_DUE_FOR_AN_HOUR}],
        ask_burst=burst,
        ask_per_minute=1,
    )
    with RunningAgent(config, engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() == 1, timeout=60, what="the first answer")
        for _ in range(10):
            listener.publish(topic("check", "door_open"), "PRESS")
            time.sleep(0.3)  # a turn apart: presses in one turn would share one encode anyway
        for flip in range(10):
            listener.publish(topic("enabled", "door_open", "set"), "OFF" if flip % 2 == 0 else "ON")
            time.sleep(0.3)
        assert agent.metrics.encodes._value.get() <= 1 + burst
    published = [message.payload for message in listener.on(topic("enabled", "door_open"))]
    assert published[0] == b"ON" and len(published) - 1 <= burst


def test_retained_commands_are_ignored(tiny_llava_int8, tiny_engine, broker, subscriber, static_video, tmp_path):
    listener = subscriber(broker, topic("enabled", "door_open"), topic("answers", "door_open"))
    listener.publish(topic("enabled", "door_open", "set"), "OFF", retain=True)
    listener.publish(topic("check"), "PRESS", retain=True)
    listener.publish(topic("check", "door_open"), "PRESS", retain=True)
    config = controls_config(tiny_llava_int8, broker, static_video, tmp_path, [{**DOOR, **NOT_DUE_FOR_AN_HOUR}])

    with RunningAgent(config, engine=tiny_engine) as agent:
        listener.next(topic("answers", "door_open"), timeout=60)
        time.sleep(2.0)
        assert agent.metrics.encodes._value.get() == 1

    assert [message.payload for message in listener.on(topic("enabled", "door_open"))] == [b"ON"]
    assert not (tmp_path / CONTROLS_FILE).exists()


HOSTILE = [
    ("enabled/door_open/set", b""),
    ("enabled/door_open/set", b"off"),
    ("enabled/door_open/set", b"OFF\x00"),
    ("enabled/door_open/set", b"\xff\xfe"),
    ("enabled/door_open/set", b"OFF" * 20_000),
    ("enabled/door_open/set", b'{"state": "OFF"}'),
    ("enabled/door_open/set", b"PRESS"),
    ("enabled/garage/set", b"OFF"),
    ("check/door_open", b"OFF"),
    ("check/door_open", b"PRESS\n"),
    ("check/garage", b"PRESS"),
    ("check", b""),
    ("check", b"\x00" * 1000),
]


def test_hostile_payloads_on_the_command_topics_do_nothing(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video, tmp_path, caplog
):
    listener = subscriber(broker, topic("enabled", "door_open"))
    config = controls_config(tiny_llava_int8, broker, static_video, tmp_path, [{**DOOR, **NOT_DUE_FOR_AN_HOUR}])
    with RunningAgent(config, engine=tiny_engine) as agent, caplog.at_level(logging.DEBUG, logger="edge_agent"):
        wait_until(lambda: agent.metrics.inferences._value.get() == 1, timeout=60, what="the first answer")
        for levels, payload in HOSTILE:
            listener.publish(f"{ROOT}/{levels}", payload)
        time.sleep(1.5)
        assert agent.metrics.encodes._value.get() == 1
        assert agent._link.connected

    assert [message.payload for message in listener.on(topic("enabled", "door_open"))] == [b"ON"]
    ignored = [record for record in caplog.records if "ignoring the message on" in record.getMessage()]
    assert len(ignored) == len(HOSTILE)
    assert all(record.levelno == logging.DEBUG for record in ignored)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
